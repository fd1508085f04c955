"""Configuration of the hybrid xLSTM student.

The teacher-shaped fields (sizes, norms, RoPE) are copied from the teacher's config under the
names Llama uses, so transformers' own rotary embedding reads them unchanged. The remaining
fields describe the hybrid attention that replaces softmax attention.
"""

from __future__ import annotations

from transformers import PretrainedConfig

SUPPORTED_FAMILIES = ("llama", "qwen2", "olmo2")
MIXERS = ("hybrid", "swa", "mlstm")


class XLSTMStudentConfig(PretrainedConfig):
    """Hybrid mLSTM + sliding-window-attention student of a Llama/Qwen2/Olmo2 teacher.

    Student fields:
        window: sliding-window length W of the SWA branch (keys t-W < s <= t).
        sinks: number S of sink tokens (the first S tokens of each sequence) every query sees.
        mixer: "hybrid" (gated mix), "swa" (SWA branch only) or "mlstm" (mLSTM branch only).
        fmap_after_rope: whether the feature maps see RoPE-rotated q/k (default False: the mLSTM
            has its own notion of order through the forget gate, and rotated inputs make the
            softmax feature map position dependent).
        igate_bias_init / fgate_bias_init / ogate_bias_init: gate bias initialisation. The forget
            bias is spread linearly over heads between the two values of ``fgate_bias_init``
            (high values = long memory).
        gate_weight_std: std of the random gate weights at conversion.
        mlstm_eps: ε of the mLSTM normaliser.
        chunk_size: chunk length of the chunkwise mLSTM.
        init_seed: RNG seed of the new parameters (same seed + same teacher = identical student).
        teacher_family: "llama" | "qwen2" | "olmo2" (norm placement, biases, QK-norm follow from it).
    """

    model_type = "xlstm_student"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 30,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        rms_norm_eps: float = 1e-5,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        teacher_family: str = "llama",
        tie_word_embeddings: bool = True,
        window: int = 512,
        sinks: int = 4,
        mixer: str = "hybrid",
        fmap_after_rope: bool = False,
        igate_bias_init: float = 0.0,
        fgate_bias_init: tuple[float, float] = (3.0, 6.0),
        ogate_bias_init: float = 0.0,
        gate_weight_std: float = 0.02,
        mlstm_eps: float = 1e-6,
        chunk_size: int = 64,
        init_seed: int = 0,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        if teacher_family not in SUPPORTED_FAMILIES:
            raise ValueError(f"teacher_family must be one of {SUPPORTED_FAMILIES}, got {teacher_family!r}")
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.teacher_family = teacher_family
        self.window = window
        self.sinks = sinks
        self.mixer = mixer
        self.fmap_after_rope = fmap_after_rope
        self.igate_bias_init = igate_bias_init
        self.fgate_bias_init = tuple(fgate_bias_init)
        self.ogate_bias_init = ogate_bias_init
        self.gate_weight_std = gate_weight_std
        self.mlstm_eps = mlstm_eps
        self.chunk_size = chunk_size
        self.init_seed = init_seed
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
