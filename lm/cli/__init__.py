"""The `lm` command line: `main.py` (the entry point and the verb table), `lightning_cli.py` (`lm fit|validate|
test|predict`), `finetune_cli.py` (`lm finetune`), `run_checks.py` (checks before a run writes anything) and
`config_errors.py` (a command-line or YAML mistake as one line). The function verbs live in lm/commands/."""
