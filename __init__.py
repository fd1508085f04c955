"""xmerge: distill a Transformer teacher into hybrid xLSTM experts, register and merge them.

Importing xmerge registers the student with transformers' Auto classes. The registry works
without torch (e.g. on a registry host), so the registration is skipped when torch is absent.
"""

try:
    import xmerge.modeling  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM)
except ImportError:  # torch or transformers not installed
    pass
