"""The names the graphs and the runtimes agree on (no onnx needed to read them): the SCR op, its plan inputs, and the
diagnostic graph's query-mask input and attention-map output."""

DOMAIN = "scr"            # no dots: TensorRT plugin namespaces reject them
OP_TYPE = "SCRNeighbourInject"
DOMAIN_VERSION = 1
PLAN_INPUTS = ("scr_donor", "scr_scale", "scr_weight")
QUERY_MASK = "scr_query_mask"     # [batch, images, seq] float: 1 at the text query positions of each image
ATTENTION_MAP = "scr_attention"   # [batch, images, seq]: mean attention from those queries to every key position
