"""The names the graphs and the runtimes agree on (no onnx needed to read them): the SCR op, its plan inputs, and the
diagnostic graph's output."""

DOMAIN = "scr"            # no dots: TensorRT plugin namespaces reject them
OP_TYPE = "SCRNeighbourInject"
DOMAIN_VERSION = 1
PLAN_INPUTS = ("scr_donor", "scr_scale", "scr_weight")
# [batch, diag layers, seq, seq] float32: each diagnostic layer's attention probabilities averaged over heads
# (queries × keys); the host reduces layers and queries in float64 (scr_export.attention_map), as every runtime does
ATTENTION_ROWS = "scr_attention_rows"
