"""Instruction tuning (lm/data/finetuning/instruction_data.py, lm/modules/instruct.py, lm/modules/lora.py): the loss mask
covers exactly the prompt tokens, right padding leaves real tokens' logits unchanged, LoRA trains only
adapter parameters and the merged model gives the adapted model's logits, `lm merge` + `lm generate
--template alpaca`, and BLEU / ROUGE of identical strings are perfect and of disjoint strings zero."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lm.io.checkpoints import load_model
from lm.cli.main import main
from lm.data.finetuning.instruction_data import IGNORE_INDEX, InstructionDataModule, encode_example, pad_batch
from lm.data.finetuning.templates import alpaca_prompt
from lm.modules.instruct import InstructionTuner
from lm.evaluation.generation_metrics import text_scores
from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint

ROWS = [{"instruction": "Name the river.", "input": "", "output": "The river was built in 1854 ."},
        {"instruction": "Where is the town?", "input": "A small town", "output": "It is found near a quiet valley ."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instruct")
    tokenizer = tiny_tokenizer()
    ckpt = write_checkpoint(tmp / "backbone.ckpt", tiny_gpt(tokenizer.vocab_size, max_position_embeddings=320), tokenizer)
    data = tmp / "alpaca.json"
    data.write_text(json.dumps(ROWS * 10), encoding="utf-8")
    return tmp, ckpt, tokenizer, data


def test_loss_mask_covers_exactly_the_prompt(setup):
    _, _, tokenizer, _ = setup
    for row in ROWS:
        prompt = tokenizer.encode(alpaca_prompt(row["instruction"], row["input"]))
        response = tokenizer.encode(row["output"]) + [tokenizer.eot_id]
        inputs, labels = encode_example(tokenizer, row, 1000)
        assert inputs == (prompt + response)[:-1]
        assert labels == [IGNORE_INDEX] * (len(prompt) - 1) + response  # targets: every response token + eot
    assert "### Input:\nA small town" in alpaca_prompt("x", "A small town") and "### Input" not in alpaca_prompt("x")
    prompt = tokenizer.encode(alpaca_prompt(ROWS[0]["instruction"]))
    inputs, labels = encode_example(tokenizer, ROWS[0], len(prompt) + 2)  # cut: the response is shortened
    assert len(inputs) == len(labels) == len(prompt) + 2 and labels[-1] != IGNORE_INDEX
    assert encode_example(tokenizer, ROWS[0], 5) is None  # the prompt alone fills the context


def test_right_padding_keeps_real_logits(setup):
    _, ckpt, tokenizer, _ = setup
    model = InstructionTuner(str(ckpt)).eval()
    pairs = [encode_example(tokenizer, row, 320) for row in ROWS]
    inputs, labels = pad_batch(pairs, tokenizer.eot_id)
    short = min(range(2), key=lambda i: len(pairs[i][0]))
    n = len(pairs[short][0])
    assert (labels[short, n:] == IGNORE_INDEX).all()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs)[short, :n], model(inputs[short:short + 1, :n])[0], rtol=1e-5, atol=1e-5)


def test_lora_trains_only_adapters_and_merges_exactly(setup):
    tmp, ckpt, tokenizer, data = setup
    tuner = InstructionTuner(str(ckpt), lora_rank=4, learning_rate=1e-2, warmup_steps=1)
    trainable = {n for n, p in tuner.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in tuner.state_dict().items()}
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(tuner, InstructionDataModule(str(data), batch_size=4))
    changed = {k for k, v in tuner.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    assert any("lora_B" in k for k in changed)
    ids = torch.tensor([tokenizer.encode(alpaca_prompt("Name the river."))])
    tuner.eval()
    with torch.no_grad():
        adapted = tuner(ids)
        merged = tuner.merged_model()
        assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-4, atol=1e-4)


def test_finetune_merge_and_generate_with_template(setup, monkeypatch, capsys):
    tmp, ckpt, tokenizer, data = setup
    monkeypatch.chdir(tmp)
    main(["finetune", "fit", "--experiment", "alpaca", "--model", "lm.modules.instruct.InstructionTuner",
          "--model.backbone", str(ckpt), "--model.lora_rank", "4", "--model.learning_rate", "1e-2",
          "--data", "lm.data.finetuning.instruction_data.InstructionDataModule", "--data.data_file", str(data), "--data.batch_size", "6",
          "--trainer.max_steps", "3", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false"])
    main(["merge", "--ckpt_path", "checkpoints/alpaca/last.ckpt", "--output", "merged.ckpt"])
    model, loaded_tokenizer = load_model(tmp / "merged.ckpt")
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    capsys.readouterr()
    main(["generate", "--ckpt_path", "merged.ckpt", "--template", "alpaca", "--prompt", "Name the river.",
          "--temperature", "0", "--max_new_tokens", "5", "--format", "jsonl"])
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    from lm.model import generate_text

    expected = generate_text(model, tokenizer, [alpaca_prompt("Name the river.")], max_new_tokens=5, temperature=0)
    assert row == {"prompt": "Name the river.", "completion": expected[0]}


def test_bleu_rouge_of_identical_and_disjoint_strings():
    same = ["the river was built in the north of england", "a quiet valley near the capital city"]
    assert text_scores(same, same) == pytest.approx({"bleu": 1.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    disjoint = ["alpha beta gamma delta epsilon", "zeta eta theta iota kappa"]
    assert text_scores(disjoint, same) == pytest.approx({"bleu": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0})


def test_serve_feedback_lines_are_instruction_data(tmp_path):
    """`lm serve`'s feedback file (JSON lines with extra keys) is read as Alpaca examples."""
    from lm.data.finetuning.instruction_data import read_alpaca
    from lm.errors import LMError

    feedback = tmp_path / "feedback.jsonl"
    rows = [{"instruction": "Name a river.", "input": "", "output": "The Thames.", "rating": 1, "corrected": True,
             "response_id": "cmpl-1", "model": "m", "time": 0.0},
            {"instruction": "Say hi.", "input": "", "output": "Hi.", "rating": 1, "corrected": False}]
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert read_alpaca(feedback) == [{"instruction": "Name a river.", "input": "", "output": "The Thames."},
                                     {"instruction": "Say hi.", "input": "", "output": "Hi."}]
    feedback.write_text('{"instruction": "x", "output": "y"}\n{broken\n', encoding="utf-8")
    with pytest.raises(LMError, match="not valid JSON lines"):
        read_alpaca(feedback)


def test_repetition_scores_count_loops_within_each_text():
    from lm.errors import LMError
    from lm.evaluation.generation_metrics import repetition_scores

    looping = "a b c d a b c d a b c d"  # 9 4-grams, the last 5 repeat the first 4
    fresh = "one two three four five six"  # 3 4-grams, none repeated; 5 distinct bigrams of 5
    scores = repetition_scores([looping, fresh])
    assert scores["repeated_4gram_share"] == pytest.approx(5 / 12)
    assert scores["distinct_2"] == pytest.approx((4 / 11 + 1.0) / 2)
    assert repetition_scores(["a b c d", "a b c d"])["repeated_4gram_share"] == 0  # across texts is no loop
    with pytest.raises(LMError, match="at least 4 words"):
        repetition_scores(["too short"])
