"""xmerge: distill a Transformer teacher into hybrid xLSTM experts, register and merge them.

Importing xmerge registers the student with transformers' Auto classes. The registration needs
torch, so it happens when transformers itself is imported (at once if it already is): commands
that only touch the registry start fast, and the registry works where torch is absent.
"""

import importlib.abc
import importlib.util
import sys


def _register_student() -> None:
    try:
        import xmerge.modeling  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM)
    except ImportError:  # torch not installed: the registry still works
        pass


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Runs the registration right after `transformers` finishes importing."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_student()

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_student()
else:
    sys.meta_path.insert(0, _AfterTransformersImport())
