"""lm-evaluation-harness with the student registered: `python -m xmerge.evals.harness ARGS` (or `xmerge-lm-eval`).

A plain `lm_eval` process never imports xmerge, so transformers does not know the student's
model_type and `--model hf --model_args pretrained=DIR` fails. This entry point imports xmerge
(which registers the student with AutoConfig / AutoModelForCausalLM), then runs lm_eval's own CLI
on the unchanged arguments. trust_remote_code stays off: no code is loaded from the model directory.

    python -m xmerge.evals.harness --model hf --model_args pretrained=student/ --tasks arc_easy
"""

from __future__ import annotations


def main() -> None:
    import xmerge.modeling  # noqa: F401  (registers the student with transformers' Auto classes)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install lm-eval==0.4.13") from None
    cli_evaluate()


if __name__ == "__main__":
    main()
