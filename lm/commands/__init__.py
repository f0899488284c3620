"""Verbs of the `lm` command that are plain typed functions (see `FUNCTION_VERBS` in lm/cli/main.py).

jsonargparse builds each verb's command line from its function's signature and docstring, so a
verb gets `--help`, `--config file.yaml` and type checking for free. A verb's entry in the table may
also name a `prepare_args(args) -> args` that normalizes its raw arguments first (e.g. repeated flags;
`lm eval` uses `lm generate`'s), or the verb is registered as `module:main` with a `main(args, prog)`
that builds its own parser (`lm prepare`, which reads the `data:` section of a training recipe).
"""
