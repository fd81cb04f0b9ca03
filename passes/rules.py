"""Every numbered rule of every pass: one enum, each member its id, its pass and one line saying
what it does. Decisions and remarks carry these ids; the README's rule table and the legend of
``amp.report()`` are generated from here (``python -m amp_compiler.passes.rules``).

A member is the id string itself (``Rule.R1_ALLOW == "R1:allow"``), so plans read back from JSON
compare equal to it. The family (``"R1"``) is the number a pass's docstring explains at length.

    >>> str(Rule.R1_ALLOW), Rule.R1_ALLOW.pass_name, Rule.R1_ALLOW.meaning
    ('R1:allow', 'propagate', 'allow ops (matrix products, convolutions) compute in the low dtype')
    >>> rule_family("D1:overflow")
    'D1'
"""

from __future__ import annotations

from enum import Enum


class Rule(str, Enum):
    """A numbered rule: ``value`` the id (``"R1:allow"``), ``pass_name``, ``meaning``."""

    pass_name: str
    meaning: str

    def __new__(cls, rule_id: str, pass_name: str, meaning: str) -> "Rule":
        member = str.__new__(cls, rule_id)
        member._value_ = rule_id
        member.pass_name = pass_name
        member.meaning = meaning
        return member

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def family(self) -> str:
        return rule_family(self.value)

    # -- hygiene: capture-time asserts and no-ops -------------------------------------------
    H1_METADATA_ASSERT = ("H1:metadata-assert", "hygiene", "capture-time dtype asserts are removed (the plan changes dtypes on purpose)")
    H2_INERT_DROPOUT = ("H2:inert-dropout", "hygiene", "dropout that cannot drop (eval mode, p == 0) is its input")
    H3_ALIAS = ("H3:alias", "hygiene", "aten.alias is its input")
    H4_DEAD_CODE = ("H4:dead-code", "hygiene", "values nobody reads are removed; side effects and submodule calls kept")
    H5_EMPTY_CAT = ("H5:empty-cat", "hygiene", "cat drops operands of static size 0 (an empty key/value cache)")
    H6_DEAD_WRITE = ("H6:dead-write", "hygiene", "a write into a tensor the graph just made and nobody reads is removed")
    H7_WHOLE_SLICE = ("H7:whole-slice", "hygiene", "a slice that keeps everything is its input")
    H8_HIGHER_ORDER = ("H8:higher-order", "hygiene", "bodies of higher-order ops are cleaned by the same rules")
    # -- sdpa_masks: masks of scaled_dot_product_attention ----------------------------------
    S1_MASK_ALL_KEPT = ("S1:mask-all-kept", "sdpa_masks", "a mask from sizes only that keeps every position is dropped")
    S2_MASK_CAUSAL = ("S2:mask-causal", "sdpa_masks", "a mask from sizes only that is the causal triangle becomes is_causal=True")
    S3_MASK_CONTIGUOUS = ("S3:mask-contiguous", "sdpa_masks", "a kept mask whose last axis is strided is made contiguous (fused kernels need it)")
    # -- fused_patterns: formulas written out become the op they are ------------------------
    P1_GELU_TANH = ("P1:gelu-tanh", "fused_patterns", "the tanh GELU written out is gelu(x, approximate='tanh')")
    P1_NO_MATCH = ("P1:no-match", "fused_patterns", "a chain that starts like the tanh GELU but does not complete it (P3)")
    P2_RMS_NORM = ("P2:rms-norm", "fused_patterns", "x * rsqrt(mean(x**2) + eps) (times a weight) is rms_norm")
    P2_NO_MATCH = ("P2:no-match", "fused_patterns", "a chain that starts like RMSNorm but does not complete it (P3)")
    P3_PARTIAL = ("P3:partial-match", "fused_patterns", "a partial match is left as it is, with a remark naming what did not match")
    P4_SILU_MUL = ("P4:silu-mul", "fused_patterns", "training: silu(a) * b keeps a and b for backward, not silu(a) too")
    P5_RECOMPUTE = ("P5:recompute-activation", "fused_patterns", "training: an activation read only by a linear layer is recomputed in backward")
    P6_ROTARY = ("P6:rotary", "fused_patterns", "training: a rotary embedding is one autograd node (5 backward kernels, not 9)")
    # -- attention: explicit attention becomes scaled_dot_product_attention -----------------
    A1_ANCHOR = ("A1:anchor", "attention", "a last-axis softmax fed by matmul(q, kT) anchors a match")
    A2_SINGLE_USE = ("A2:single-use", "attention", "every intermediate of the score chain has one user, the next op")
    A3_KEY = ("A3:key", "attention", "kT is a transpose or permute of the last two axes of k")
    A4_SCALE = ("A4:scale", "attention", "constant scalings of the scores, q or k multiply into one scale")
    A5_DEFAULT_SCALE = ("A5:default-scale", "attention", "scale= is passed only when it differs from 1/sqrt(E)")
    A6_CAUSAL_MASK = ("A6:causal-mask", "attention", "at most one mask; a constant causal masked_fill becomes is_causal=True")
    A7_ADDITIVE_MASK = ("A7:additive-mask", "attention", "scores + m becomes attn_mask=m")
    A8_DROPOUT = ("A8:dropout", "attention", "dropout on the probabilities becomes dropout_p")
    A9_NAMING = ("A9:naming", "attention", "the new node is named after the softmax it replaces")
    A10_CLEANUP = ("A10:cleanup", "attention", "nodes left without users by the rewrite are removed")
    # -- classify: op kind -> category -------------------------------------------------------
    C1_CATEGORY = ("C1:category", "classify", "a compute op gets the category its kind has in the policy table")
    C2_UNKNOWN = ("C2:unknown", "classify", "kinds no table names are unknown: fp32, they stop propagation")
    C3_NON_FLOAT = ("C3:non-float", "classify", "values that are not floating point (indices, masks, shapes) are non_float")
    C4_OVERRIDES = ("C4:overrides", "classify", "keep_fp32 / force_low entries are resolved to nodes")
    C5_NO_KERNEL = ("C5:no-kernel", "classify", "a kind whose low kernel this device lacks is probed once and listed")
    C6_COMPLEX = ("C6:complex", "classify", "ops that make or read complex numbers are complex")
    # -- propagate: painting precisions -----------------------------------------------------
    R0_SOURCE = ("R0:source", "propagate", "inputs, parameters and constants keep their dtype")
    R0_FACTORY = ("R0:factory", "propagate", "a factory (zeros, arange, ...) keeps the dtype it makes")
    R0_FLOAT64 = ("R0:float64", "propagate", "float64 values are never lowered")
    R0_MODULE_DTYPE = ("R0:module-dtype", "propagate", "a leaf module stored in a low dtype computes in it")
    R0_NON_FLOAT = ("R0:non-float", "propagate", "a value that is not floating point has no precision")
    R0_OUTPUT = ("R0:output", "propagate", "the graph's outputs keep the model's dtypes")
    R0_PASSTHROUGH = ("R0:passthrough", "propagate", "ops that only unpack or index keep their input's dtype")
    R0_USER_CAST = ("R0:user-cast", "propagate", "a cast the model writes itself keeps its dtype")
    R1_ALLOW = ("R1:allow", "propagate", "allow ops (matrix products, convolutions) compute in the low dtype")
    R1_USER_FP32 = ("R1:user-fp32", "propagate", "a matrix op whose operands the model casts to fp32 itself stays fp32")
    R2_DENY = ("R2:deny", "propagate", "deny ops (exp, log, pow, losses, ...) compute in fp32")
    R2_DENY_SPREAD = ("R2:deny-spread", "propagate", "fp32 spreads forward from a deny op through infer/clear ops")
    R3_BETWEEN_LOW = ("R3:between-low", "propagate", "infer/clear ops between two low ops are low")
    R3_FP32_CONSUMER = ("R3:fp32-consumer", "propagate", "an op between low ops stays fp32 for a consumer that needs fp32")
    R3_FP32_INPUT = ("R3:fp32-input", "propagate", "an op between low ops stays fp32 for an fp32 input it would round")
    R4_CLEAR_CHAIN = ("R4:clear-chain", "propagate", "low precision spreads through chains of clear ops")
    R5_FP32_ACC_LOW = ("R5:fp32-acc-low", "propagate", "an fp32-accumulating op is low when its producer and consumers are")
    R5_FP32_ACC_FP32 = ("R5:fp32-acc-fp32", "propagate", "an fp32-accumulating op next to fp32 neighbours is fp32")
    R6_KEEP_FP32 = ("R6:keep_fp32", "propagate", "the user's keep_fp32 entry: fp32, whatever the rules say")
    R6_FORCE_LOW = ("R6:force_low", "propagate", "the user's force_low entry: low, over the built-in rules")
    R7_FOLLOW_FP32 = ("R7:follow-fp32", "propagate", "infer/clear ops outside low regions stay fp32")
    R7_UNKNOWN = ("R7:unknown", "propagate", "ops no policy table knows stay fp32")
    R8_NO_KERNEL = ("R8:no-kernel", "propagate", "an op without a low kernel on this device is fp32")
    R9_COMPLEX = ("R9:complex", "propagate", "complex-valued ops are fp32")
    # -- ranges: calibration pins ------------------------------------------------------------
    D1_OVERFLOW = ("D1:overflow", "ranges", "a value beyond data_max on calibration data is computed in fp32")
    D2_UNDERFLOW = ("D2:underflow", "ranges", "a value mostly below the low dtype's smallest normal is fp32")
    D3_REDUCTION = ("D3:reduction", "ranges", "a reduction whose terms can sum past acc_max is fp32")
    D4_PRECISION = ("D4:precision", "ranges", "a node whose own low-precision error exceeds local_error is fp32")
    # -- tolerance: the search ----------------------------------------------------------------
    T1_TOLERANCE = ("T1:tolerance", "tolerance", "moved to fp32 by the tolerance search, with its measured contribution")
    # -- insert_casts: applying the plan to the FX graph -------------------------------------
    I1_CASTABLE = ("I1:castable", "insert_casts", "an input is cast only where its use is castable (never indices, masks)")
    I2_ONE_PER_DTYPE = ("I2:one-per-dtype", "insert_casts", "at most one cast per (value, dtype), shared by its consumers")
    I3_NO_CHAINS = ("I3:no-chains", "insert_casts", "no cast to a value's own dtype, no cast of a cast")
    I4_PLACEMENT = ("I4:placement", "insert_casts", "a cast is placed right before its first consumer")
    I5_OUTPUTS = ("I5:outputs", "insert_casts", "graph outputs are restored to the dtype the model returned")
    I6_LEAF_MODULE = ("I6:leaf-module", "insert_casts", "a low leaf module (nn.LSTM) runs with its parameters cast")
    I7_PROMOTION = ("I7:promotion", "insert_casts", "an fp32 elementwise op reads low operands as they are (type promotion)")
    I8_SCALAR_OPERAND = ("I8:scalar-operand", "insert_casts", "a 0-dim fp32 operand of a low elementwise op is not cast")
    I9_SATURATED_FILL = ("I9:saturated-fill", "insert_casts", "a fill value beyond the low range fills with that dtype's extreme")
    # -- fused_cross_entropy: chunked cross-entropy over a vocabulary-sized linear layer -----
    X1_PATTERN = ("X1:pattern", "fused_cross_entropy", "cross_entropy(float(linear(h))) over a vocabulary is the pattern")
    X1_NO_MATCH = ("X1:no-match", "fused_cross_entropy", "a cross-entropy whose input is not a linear layer's output")
    X2_MIN_VOCAB = ("X2:min-vocab", "fused_cross_entropy", "only for vocabularies of at least MIN_VOCAB classes")
    X3_FUSED = ("X3:fused", "fused_cross_entropy", "the loss is computed in chunks: fp32 logits never held for all rows")
    X4_LOGITS = ("X4:logits", "fused_cross_entropy", "logits read elsewhere are computed in the same chunks")
    X4_NO_MATCH = ("X4:no-match", "fused_cross_entropy", "logits read by something the node cannot return are left unfused")
    X5_LOSS_SCALE = ("X5:loss-scale", "fused_cross_entropy", "fp16 training hands the node the loss scale")
    X6_COMPILE = ("X6:compile", "fused_cross_entropy", "under torch.compile the node computes the unfused expression")
    X7_PADDED_VOCAB = ("X7:padded-vocab", "fused_cross_entropy", "on CUDA chunks compute classes padded to a multiple of 64")
    X8_LOW_LOGITS = ("X8:low-logits", "fused_cross_entropy", "training: logits returned beside the loss stay in the layer's dtype")
    # -- fold_weights: inference weights cast once --------------------------------------------
    F1_FOLD = ("F1:fold", "fold_weights", "a cast of a parameter becomes a stored low-precision copy")
    F2_DROP_ORIGINAL = ("F2:drop-original", "fold_weights", "the fp32 original is dropped from the graph module")
    F3_LEAF_COPY = ("F3:leaf-copy", "fold_weights", "a low leaf module is replaced by a low-precision copy")
    F4_WRITTEN_BUFFER = ("F4:written-buffer", "fold_weights", "a buffer the graph writes is not folded")
    F5_RECORD = ("F5:record", "fold_weights", "every stored copy is recorded with its original's key")
    # -- loss_scaling: fp16 training ----------------------------------------------------------
    L1_FIND_LOSS = ("L1:find-loss", "loss_scaling", "the loss is a scalar output, a 'loss' entry or the first element")
    L2_SCALE_GRAD = ("L2:scale-grad", "loss_scaling", "the loss gradient is multiplied by the scale inside backward")
    L3_LOGITS = ("L3:logits", "loss_scaling", "graphs returning no scalar loss leave scaling to the caller")
    L4_UNSCALE = ("L4:unscale", "loss_scaling", "gradients are divided by the scale where they leave the graph")
    L5_FUSED_LOSS = ("L5:fused-loss", "loss_scaling", "a fused cross-entropy gets the same scale")
    # -- size_cache: what is computed from input sizes only -----------------------------------
    K1_SIZE_ONLY = ("K1:size-only", "size_cache", "a node computed from input sizes and constants only is size-only")
    K2_CACHED = ("K2:cached", "size_cache", "size-only values run once per input shape, then come from a cache")
    K3_NOT_CACHED = ("K3:not-cached", "size_cache", "returned or written values and small regions are not cached")
    # -- onnx_rewrite: the plan applied to an ONNX graph ----------------------------------------
    W1_FOLLOW = ("W1:follow", "onnx_rewrite", "an input sharing the schema's type variable gets the compute precision")
    W2_NO_FLOAT = ("W2:no-float", "onnx_rewrite", "a node with no float precision reads its inputs as they are")
    W3_ONE_CAST = ("W3:one-cast", "onnx_rewrite", "one Cast per (value, dtype), before its first consumer")
    W4_INITIALIZERS = ("W4:initializers", "onnx_rewrite", "initializers are converted in place, duplicated when consumers differ")
    W5_IO_TYPES = ("W5:io-types", "onnx_rewrite", "outputs keep their names and source dtype (keep_io_types)")
    W6_SUBGRAPHS = ("W6:subgraphs", "onnx_rewrite", "If/Loop/Scan bodies are left as they are")
    W7_VALUE_INFO = ("W7:value-info", "onnx_rewrite", "stale value_info is dropped and shape inference re-run")
    W8_FILL = ("W8:fill", "onnx_rewrite", "a ConstantOfShape read through one Cast makes the cast's dtype")
    W9_TRANSPOSES = ("W9:transposes", "onnx_rewrite", "no Transpose -> Cast -> MatMul that ORT's fusion crashes on")
    W10_PLACEMENT = ("W10:placement", "onnx_rewrite", "Casts the plan does not need are removed or moved (C1-C6)")
    # -- onnx_cast_placement: Casts an ONNX file does not need --------------------------------
    C1_IDENTITY_CAST = ("C1", "onnx_cast_placement", "a Cast to the type its input has is the identity")
    C2_WIDENING = ("C2", "onnx_cast_placement", "an exact widening round trip of Casts is one Cast")
    C3_SIBLINGS = ("C3", "onnx_cast_placement", "two Casts of one value to one type: one stays")
    C4_INITIALIZER = ("C4", "onnx_cast_placement", "a Cast of an initializer becomes a stored initializer")
    C5_MOVE_UP = ("C5", "onnx_cast_placement", "a Cast below a movement op moves above it, to meet others")
    C6_SAME_MOVE = ("C6", "onnx_cast_placement", "two identical movement nodes: one stays")
    # -- onnx_fp64 / onnx_layer_norm: ONNX clean-ups ----------------------------------------------
    E1_FP64_INITIALIZERS = ("E1:fp64-initializers", "onnx_fp64", "float64 initializers are stored as float32")
    E2_FP64_CASTS = ("E2:fp64-casts", "onnx_fp64", "casts and dtype attributes to float64 become float32")
    E3_FP64_BORDER = ("E3:fp64-border", "onnx_fp64", "float64 inputs and outputs keep their type at the border")
    N1_LAYER_NORM = ("N1:layer-norm", "onnx_layer_norm", "a LayerNorm written out (opset < 17 exporters) becomes LayerNormalization")
    # -- onnx convert: the ONNX front end's own pins ------------------------------------------------
    O1_SUBGRAPH = ("O1:subgraph", "onnx.convert", "nodes with subgraphs stay fp32, their bodies unconverted")
    O2_SCHEMA = ("O2:schema", "onnx.convert", "a node whose schema does not allow the low dtype stays fp32")
    O3_RANGE = ("O3:range", "onnx.convert", "with calibration: an output beyond D1's data_max is fp32")
    O4_INIT_RANGE = ("O4:init-range", "onnx.convert", "a node reading an initializer beyond the low range is fp32")
    O5_REDUCTION_DEPTH = ("O5:reduction-depth", "onnx.convert", "a product summing more than max_reduction_depth terms is fp32")
    O6_MASK = ("O6:mask", "onnx.convert", "an additive attention mask is clamped to the low range")
    O7_GELU_CUBE = ("O7:gelu-cube", "onnx.convert", "the cube of the tanh GELU runs low")
    O8_LOW_TABLE = ("O8:low-table", "onnx.convert", "embedding tables are stored in the low dtype")
    O9_TRADED = ("O9:traded", "onnx.convert", "an fp32 island goes low where ORT measures fewer Casts within tolerance")
    O10_CONSTANT_TABLE = ("O10:constant-table", "onnx.convert", "a table computed from initializers and shapes is computed once, low")
    O11_LAYER_NORM = ("O11:layer-norm", "onnx.convert", "a written-out LayerNorm is fused at opset >= 17 (N1)")
    O12_FP64 = ("O12:fp64", "onnx.convert", "fp64='fp32': float64 becomes float32 inside (E1-E3)")


def rule_family(rule_id: str) -> str:
    """The numbered part of a rule id: 'R1' for 'R1:allow', 'C1' for 'C1'."""
    return rule_id.partition(":")[0]


def pass_of(rule_id: str) -> str | None:
    """The pass a rule id belongs to (None for an id no pass has: a plan from elsewhere)."""
    try:
        return Rule(rule_id).pass_name
    except ValueError:
        return None


def meaning(rule_id: str) -> str | None:
    """The one-line meaning of a rule id (a plan read back from JSON holds plain strings)."""
    try:
        return Rule(rule_id).meaning
    except ValueError:
        return None


def markdown_table() -> str:
    """The README's rule table: pass, rule id, meaning; one row per rule, in pipeline order."""
    rows = ["| pass | rule | what it does |", "|---|---|---|"]
    rows += [f"| `{r.pass_name}` | `{r.value}` | {r.meaning} |" for r in Rule]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
