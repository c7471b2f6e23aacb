"""ONNX graph rewriting on onnx_ir: locate decoder layer outputs, insert SCR redistribution, extract the diagnostic."""

from .scr_op import DOMAIN, DOMAIN_VERSION, OP_TYPE, PLAN_INPUTS, reference, scr_function, standalone_model

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OP_TYPE", "PLAN_INPUTS", "reference", "scr_function", "standalone_model"]
