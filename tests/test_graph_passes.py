"""Graph passes on real exported decoders (both exporters): locate layers, insert SCR, parity with the reference."""

from __future__ import annotations

import numpy as np
import pytest

import onnx as onnx  # noqa: E402  (installed by the README's test command)
import onnxruntime as ort  # noqa: E402  (installed by the README's test command)
import onnx_ir as ir  # noqa: E402  (installed by the README's test command)

from conftest import TINY_PRESETS, load, make_image  # noqa: E402
from graph_passes.insert_redistribution import InsertRedistributionPass, PreconditionError  # noqa: E402
from graph_passes.locate_layers import LayerOutputsNotFound, find_layer_outputs  # noqa: E402
from scr_export.onnx_export.decoder import captured_decoder_inputs, export_decoder, kv_shape  # noqa: E402
from scr_export.processing import encode  # noqa: E402
from scr_export.reference import generate  # noqa: E402

_EXPORTS: dict[tuple[str, str], str] = {}
# dynamo (the default) for every family; the legacy TorchScript exporter on one family (it is 10x faster to export
# but is deprecated, and its graphs differ only in how layer outputs are named)
GRAPHS = [(f, "dynamo") for f in sorted(TINY_PRESETS)] + [("llava", "legacy")]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    def get(family: str, exporter: str = "dynamo") -> str:
        key = (family, exporter)
        if key not in _EXPORTS:
            path = tmp_path_factory.mktemp(f"{family}-{exporter}") / "decoder.onnx"
            export_decoder(load(TINY_PRESETS[family]), path, dynamo=exporter == "dynamo")
            _EXPORTS[key] = str(path)
        return _EXPORTS[key]

    return get


def _session(model: "ir.Model"):
    model = ir.external_data.load_to_model(model)  # exports keep weights beside the .onnx file
    proto = ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _feed(vlm, dec, plan=None):
    kv, head_dim = kv_shape(vlm)
    batch = dec["inputs_embeds"].shape[0]
    feed = {"inputs_embeds": dec["inputs_embeds"].numpy(), "attention_mask": dec["attention_mask"].numpy(),
            "position_ids": dec["position_ids"].numpy()}
    for i in range(vlm.num_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((batch, kv, 0, head_dim), np.float32)
    if plan is not None:
        feed.update(scr_donor=plan.donor, scr_scale=plan.scale, scr_weight=plan.weight)
    return feed


def _finite_rel(a, b):
    keep = np.abs(b) < 1e30  # Chameleon's masked image-token logits are finfo.min on both sides
    assert np.array_equal(a[~keep], b[~keep])
    return np.abs(a[keep] - b[keep]).max() / np.abs(b[keep]).max()


@pytest.mark.parametrize("family_name, exporter", GRAPHS)
def test_located_layer_outputs_equal_the_torch_layer_outputs(family_name, exporter, exported, image):
    vlm = load(TINY_PRESETS[family_name])
    model = ir.load(exported(family_name, exporter))
    found = find_layer_outputs(model)
    assert sorted(found) == list(range(vlm.num_layers))
    assert {f.rule for f in found.values()} == {"dynamo" if exporter == "dynamo" else "legacy"}
    for f in found.values():  # expose every located value as an output and compare with PyTorch hooks
        model.graph.outputs.append(f.value)
    inputs = encode(vlm, [[image]], ["Where is the red block?"])
    dec = captured_decoder_inputs(vlm, inputs.tensors)
    outs = _session(model).run([found[i].value.name for i in range(vlm.num_layers)], _feed(vlm, dec))
    import torch

    seen = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone()))
               for i, layer in enumerate(vlm.decoder_layers())]
    try:
        with torch.no_grad():
            vlm.model(**vlm.forward_inputs(inputs.tensors), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, seen[i].numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family_name, exporter", GRAPHS)
def test_inserted_scr_matches_the_reference_prefill(family_name, exporter, exported, image):
    vlm = load(TINY_PRESETS[family_name])
    cfg = vlm.scr_config()
    inputs = encode(vlm, [[image]], ["Where is the red block?"])
    on = generate(vlm, inputs, cfg, max_new_tokens=1, keep_prefill_logits=True)
    off = generate(vlm, inputs, cfg, scr=False, max_new_tokens=1, keep_prefill_logits=True)
    model = ir.load(exported(family_name, exporter))
    scr_pass = InsertRedistributionPass(cfg.layer_indices())
    result = scr_pass(model)
    assert result.modified and sorted(scr_pass.inserted) == list(cfg.layer_indices())
    sess = _session(result.model)
    dec = captured_decoder_inputs(vlm, inputs.tensors)
    got_on = sess.run(["logits"], _feed(vlm, dec, on.plan))[0]
    from scr_export.plan import SequencePlan

    got_off = sess.run(["logits"], _feed(vlm, dec, SequencePlan.identity(*inputs.shape)))[0]
    assert _finite_rel(got_on, on.prefill_logits) <= 1e-4
    assert _finite_rel(got_off, off.prefill_logits) <= 1e-4
    assert not np.allclose(got_on, got_off), "the SCR nodes must change the logits"


def test_insert_twice_is_refused(exported):
    model = ir.load(exported("llava"))
    InsertRedistributionPass(range(0, 2))(model)
    with pytest.raises(PreconditionError) as info:
        InsertRedistributionPass(range(0, 2))(model)
    assert "already has SCR plan inputs" in str(info.value) + str(info.value.__cause__)


def test_unlocatable_layers_fail_with_reasons(exported):
    model = ir.load(exported("llava"))
    for node in model.graph:
        node.metadata_props.clear()
        node.name = f"n{id(node)}"
    with pytest.raises(LayerOutputsNotFound) as info:
        find_layer_outputs(model)
    msg = str(info.value)
    assert "dynamo name scopes: no Add node matched" in msg and "legacy node names: no Add node matched" in msg
    with pytest.raises(LayerOutputsNotFound, match="layer 9 was asked for"):
        find_layer_outputs(ir.load(exported("llava")), range(0, 10))


def test_external_data_round_trip_keeps_ir_10(exported, tmp_path):
    model = ir.load(exported("qwen2_vl"))
    src = tmp_path / "ext.onnx"
    ir.save(model, src, external_data="ext.onnx.data")
    assert (tmp_path / "ext.onnx.data").stat().st_size > 100_000
    reloaded = ir.load(src)
    InsertRedistributionPass(range(0, 2))(reloaded)
    dst = tmp_path / "out" / "scr.onnx"
    dst.parent.mkdir()
    ir.save(reloaded, dst, external_data="scr.onnx.data")
    proto = onnx.load(str(dst), load_external_data=False)
    assert proto.ir_version == 10
    assert any(f.name == "SCRNeighbourInject" and f.domain == "scr" for f in proto.functions)
    scr_nodes = [n for n in proto.graph.node if n.op_type == "SCRNeighbourInject"]
    assert len(scr_nodes) == 2
    for n in scr_nodes:  # what TensorRT's parser needs to prefer the plugin over the function body
        attrs = {a.name: a.s.decode() for a in n.attribute}
        assert attrs == {"plugin_namespace": "scr", "plugin_version": "1"}
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family_name, exporter", GRAPHS)
def test_extracted_diagnostic_graph_gives_the_reference_attention_map(family_name, exporter, exported, image):
    """The diagnostic graph hands over each diagnostic layer's head-mean rows: equal to the PyTorch model's, and
    through the shared float64 reduction the same attention map."""
    from graph_passes.contract import ATTENTION_ROWS
    from graph_passes.extract_diagnostic import ExtractDiagnosticPass
    from scr_export.attention_map import batch_maps
    from scr_export.diagnostic import attention_maps, head_mean_attention

    vlm = load(TINY_PRESETS[family_name])
    cfg = vlm.scr_config()
    model = ir.load(exported(family_name, exporter))
    n_before = len(list(model.graph))
    ExtractDiagnosticPass(cfg.diag_layer_indices())(model)
    assert len(list(model.graph)) < n_before  # cut after the last diagnostic layer, head removed
    assert [v.name for v in model.graph.outputs] == [ATTENTION_ROWS]
    a, b = make_image(seed=1), make_image(seed=2)
    inputs = encode(vlm, [[a, b]], ["Compare the pictures."])
    spans = inputs.layouts[0]
    dec = captured_decoder_inputs(vlm, inputs.tensors)
    sess = _session(model)
    feed = {k: v for k, v in _feed(vlm, dec).items() if k in {i.name for i in sess.get_inputs()}}
    rows = sess.run([ATTENTION_ROWS], feed)[0]
    want_rows = head_mean_attention(vlm, inputs.to("cpu").tensors, cfg)
    assert rows.shape == want_rows.shape == (1, len(cfg.diag_layer_indices()), *inputs.shape[1:], inputs.shape[1])
    np.testing.assert_allclose(rows, want_rows, rtol=1e-5, atol=1e-8)
    got = batch_maps(rows, inputs.array("input_ids"), inputs.array("attention_mask"), inputs.layouts)[0]
    want = attention_maps(vlm, inputs.to("cpu").tensors, inputs.layouts, cfg)[0]
    for i, span in enumerate(spans):
        np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-8)
