"""The hybrid xLSTM student: config, model, cache, teacher loading and conversion."""

from transformers import AutoConfig, AutoModelForCausalLM

from xmerge.modeling.config import XLSTMStudentConfig
from xmerge.modeling.student import XLSTMStudentForCausalLM

AutoConfig.register(XLSTMStudentConfig.model_type, XLSTMStudentConfig, exist_ok=True)
AutoModelForCausalLM.register(XLSTMStudentConfig, XLSTMStudentForCausalLM, exist_ok=True)

__all__ = ["XLSTMStudentConfig", "XLSTMStudentForCausalLM"]
