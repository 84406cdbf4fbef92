"""The encoder and its heads equal transformers' Longformer on the same weights; loading is strict."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.models.longformer import modeling_longformer as hf_modeling

from longdoc_cli.attention import reference_attention
from longdoc_cli.errors import LongdocError
from longdoc_cli.model import (
    ACTIVATIONS,
    IN_PLACE_ACTIVATIONS,
    LongformerConfig,
    LongformerEncoder,
    LongformerForQuestionAnswering,
    LongformerForSequenceClassification,
    load_hf_config,
    question_global_mask,
)

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

VOCAB, SEP, PAD = 100, 2, 1
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
    attention_window=[4, 8, 4], max_position_embeddings=80, pad_token_id=PAD, bos_token_id=0,
    eos_token_id=SEP, sep_token_id=SEP, type_vocab_size=1, layer_norm_eps=1e-5,
)  # fmt: skip
PAIRS = {
    "encoder": (transformers.LongformerModel, LongformerEncoder),
    "classification": (transformers.LongformerForSequenceClassification, LongformerForSequenceClassification),
    "qa": (transformers.LongformerForQuestionAnswering, LongformerForQuestionAnswering),
}


def hf_model(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LongformerConfig(**{**TINY, **overrides}, num_labels=2 if kind == "qa" else 3)
    model = PAIRS[kind][0](config).eval()
    with torch.no_grad():  # HF's init leaves biases and LayerNorms trivial; make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(T: int = 37):
    """Three rows: full, padded, mostly padding; '<s> question </s></s> context </s>' layout."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, T), generator=g)
    ids[:, 0] = 0
    lengths = [T, 30, 9]
    am = torch.zeros(3, T, dtype=torch.long)
    for b, (length, q_len) in enumerate(zip(lengths, [6, 4, 2], strict=True)):
        am[b, :length] = 1
        ids[b, length:] = PAD
        ids[b, [q_len, q_len + 1, length - 1]] = SEP
    gm = torch.zeros(3, T, dtype=torch.long)
    gm[0, [0, 10, 36]] = 1  # first, middle, very end
    gm[1, [0, 3, 4, 5, 33]] = 1  # several inside one window, and one on padding (ignored)
    gm[2, 0] = 1
    return ids, am, gm


def outputs(kind: str, model, ids, am, gm, is_hf: bool) -> list[torch.Tensor]:
    if not is_hf:
        out = model(ids, am, gm)
        return list(out) if isinstance(out, tuple) else [out]
    out = model(input_ids=ids, attention_mask=am, global_attention_mask=gm)
    if kind == "encoder":
        return [out.last_hidden_state]
    if kind == "classification":
        return [out.logits]
    return [out.start_logits, out.end_logits]


def assert_same_on_real(a: list[torch.Tensor], b: list[torch.Tensor], am: torch.Tensor, atol=1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        if x.dim() >= 2 and x.shape[1] == am.shape[1]:  # per-token outputs: compare real tokens only
            x, y = x[am.bool()], y[am.bool()]
        assert (x - y).abs().max().item() <= atol, (x - y).abs().max().item()


@pytest.mark.parametrize("kind", PAIRS)
def test_hf_checkpoint_loads_and_matches(kind, tmp_path):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path)
    ours = PAIRS[kind][1].from_pretrained(tmp_path)
    ids, am, gm = batch()
    with torch.no_grad():
        assert_same_on_real(outputs(kind, ours, ids, am, gm, False), outputs(kind, hf, ids, am, gm, True), am)


@pytest.mark.parametrize("kind", PAIRS)
def test_our_checkpoint_loads_in_hf_and_matches(kind, tmp_path):
    hf = hf_model(kind, seed=1)
    ours = PAIRS[kind][1](LongformerConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)  # our own weights; then round-trip
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [ours.hf_architecture]
    hf2 = PAIRS[kind][0].from_pretrained(tmp_path).eval()
    ids, am, gm = batch()
    with torch.no_grad():
        assert_same_on_real(
            outputs(kind, ours, ids, am, gm, False), outputs(kind, hf2, ids, am, gm, True), am
        )
    for key, value in ours.state_dict().items():  # every weight arrived unchanged
        assert torch.equal(hf2.state_dict()[key], value), key


def test_gradients_match_hf(tmp_path):
    hf = hf_model("encoder", seed=2)
    hf.save_pretrained(tmp_path)
    ours = LongformerEncoder.from_pretrained(tmp_path)
    ids, am, gm = batch()
    upstream = torch.randn(*ids.shape, TINY["hidden_size"]) * am[..., None]
    (outputs("encoder", ours, ids, am, gm, False)[0] * upstream).sum().backward()
    (outputs("encoder", hf, ids, am, gm, True)[0] * upstream).sum().backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if name.startswith("pooler."):
            continue
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked == len(hf_params) - 2
    assert ours.encoder.layer[0].attention.self.key_global.weight.grad.abs().sum() > 0


def test_pytorch_model_bin_and_roberta_prefix(tmp_path):
    hf = hf_model("classification", seed=4)
    hf.config.save_pretrained(tmp_path)
    state = {k.replace("longformer.", "roberta.", 1): v for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = LongformerForSequenceClassification.from_pretrained(tmp_path)
    ids, am, gm = batch()
    with torch.no_grad():
        a = outputs("classification", ours, ids, am, gm, False)
        assert_same_on_real(a, outputs("classification", hf, ids, am, gm, True), am)
    # the bare encoder loads from the same task checkpoint
    encoder = LongformerEncoder.from_pretrained(tmp_path)
    with torch.no_grad():
        hidden = encoder(ids, am, gm)
        assert_same_on_real([hidden], [hf.longformer(ids, am, global_attention_mask=gm)[0]], am)


def test_default_global_masks_equal_hf(tmp_path):
    ids, am, _ = batch()
    expected = hf_modeling._compute_global_attention_mask(ids, SEP)
    assert torch.equal(question_global_mask(ids, SEP), expected.bool())
    for kind in ("qa", "classification"):
        hf = hf_model(kind, seed=5)
        hf.save_pretrained(tmp_path / kind)
        ours = PAIRS[kind][1].from_pretrained(tmp_path / kind)
        with torch.no_grad():
            a = ours(ids, am)
            b = hf(input_ids=ids, attention_mask=am)
        a = list(a) if isinstance(a, tuple) else [a]
        b = [b.start_logits, b.end_logits] if kind == "qa" else [b.logits]
        assert_same_on_real(a, b, am)


def dense_reference_forward(model: LongformerEncoder, ids, am, gm) -> torch.Tensor:
    """The model's wiring with reference_attention in place of the fast attention paths."""
    am, gm = am.bool(), gm.bool() & am.bool()
    x = model.embeddings(ids)
    B, T, _ = x.shape
    for layer in model.encoder.layer:
        att = layer.attention.self
        H, Dh = att.num_heads, att.head_dim

        def heads(t):
            return t.view(B, T, H, Dh).transpose(1, 2)  # noqa: B023

        projections = [heads(getattr(att, name)(x)) for name in
                       ("query", "key", "value", "query_global", "key_global", "value_global")]  # fmt: skip
        a = reference_attention(
            *projections, window=att.window, dilation=att.dilation, attention_mask=am, global_mask=gm
        )
        x = layer.attention.output(a.transpose(1, 2).reshape(B, T, -1), x)
        x = layer.output(layer.intermediate(x), x)
    return x


@pytest.mark.parametrize(
    "dilation",
    [[1, 2, 1], [[1, 2, 3, 1], [2, 2, 1, 1], [3, 1, 1, 2]]],
    ids=["per-layer", "per-layer-per-head"],
)
def test_dilation_equals_dense_reference(dilation):
    torch.manual_seed(6)
    config = LongformerConfig.from_dict({**TINY, "attention_dilation": dilation})
    model = LongformerEncoder(config).double().eval()
    ids, am, gm = batch()
    with torch.no_grad():
        ref = dense_reference_forward(model, ids, am, gm)
        out = model(ids, am, gm)
    torch.testing.assert_close(out[am.bool()], ref[am.bool()], atol=1e-10, rtol=0)


def test_short_sequences_train_on_the_batch_band_mask(tmp_path, monkeypatch):
    """Windows that cover most of the input (w + 1 < T <= 2w + 1: one masked dense call per layer on
    the CPU): the band mask is built once per batch and window, not per layer; outputs equal
    transformers' (float64), and outputs and every parameter's gradient the dense reference's (odd
    length, padding, a row mostly padding, several globals, one on padding, three rows). HF's own
    float64 gradients of the embeddings are NaN here, hence the reference for the gradients."""
    from longdoc_cli import attention

    built = []
    mask_of = attention.short_band_mask
    monkeypatch.setattr("longdoc_cli.model.short_band_mask", lambda *a: built.append(a[2]) or mask_of(*a))
    # one-sided windows 32, 64, 32 (HF pads T to a multiple of every two-sided window)
    hf = hf_model("encoder", seed=8, attention_window=[64, 128, 64]).double()
    hf.save_pretrained(tmp_path)
    ours = LongformerEncoder.from_pretrained(tmp_path).double()
    ids, am, gm = batch()  # T = 37: 33 < 37 <= 65 in layers 0 and 2; all keys in band in layer 1
    upstream = torch.randn(*ids.shape, TINY["hidden_size"], dtype=torch.float64) * am[..., None]
    a = outputs("encoder", ours, ids, am, gm, False)[0]
    assert built == [32]  # one mask for layers 0 and 2
    with torch.no_grad():  # inference takes the same mask (its global rows merged in place)
        torch.testing.assert_close(ours(ids, am, gm), a.detach(), atol=1e-12, rtol=0)
    b = outputs("encoder", hf, ids, am, gm, True)[0]
    real = am.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)  # HF: finite mask values
    ours_params = dict(ours.named_parameters())
    got = torch.autograd.grad((a * upstream).sum(), list(ours_params.values()), allow_unused=True)
    ref = dense_reference_forward(ours, ids, am, gm)  # the spec, float64
    torch.testing.assert_close(a[real], ref[real], atol=1e-12, rtol=0)
    want = torch.autograd.grad((ref * upstream).sum(), list(ours_params.values()), allow_unused=True)
    checked = 0
    for name, g, w in zip(ours_params, got, want, strict=True):
        if not name.startswith("pooler."):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=0, msg=name)
            checked += 1
    assert checked == len(ours_params) - 2


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(7)
    config = LongformerConfig.from_dict(
        {**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    )
    model = LongformerForSequenceClassification(config).train()
    ids, am, gm = batch()

    def grads():
        model.zero_grad()
        model(ids, am, gm).square().sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.longformer.encoder.gradient_checkpointing
    checkpointed = grads()
    for key, g in plain.items():
        torch.testing.assert_close(checkpointed[key], g, atol=1e-7, rtol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def saved(tmp_path):
    LongformerEncoder(LongformerConfig.from_dict(TINY)).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(LongdocError, match="no config.json"):
        LongformerEncoder.from_pretrained(tmp_path)
    with pytest.raises(LongdocError, match="not a directory"):
        LongformerEncoder.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_wrong_model_type_suggests_convert(saved, model_type):
    data = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**data, "model_type": model_type}))
    with pytest.raises(LongdocError, match=r"config\.json.*longdoc convert"):
        LongformerEncoder.from_pretrained(saved)


def test_corrupt_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(LongdocError, match=r"config\.json"):
        load_hf_config(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(LongdocError, match="no model.safetensors or pytorch_model.bin"):
        LongformerEncoder.from_pretrained(saved)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_weights(saved, name):
    (saved / "model.safetensors").unlink()
    (saved / name).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LongdocError, match=name.replace(".", r"\.")):
        LongformerEncoder.from_pretrained(saved)


def test_weight_shapes_not_matching_config(saved):
    data = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**data, "intermediate_size": 48}))
    with pytest.raises(LongdocError, match=r"intermediate\.dense\.weight has shape \(64, 32\).*\(48, 32\)"):
        LongformerEncoder.from_pretrained(saved)


def test_missing_encoder_weight_and_missing_head(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(LongdocError, match="no sequence-classification head"):
        LongformerForSequenceClassification.from_pretrained(saved)
    model = LongformerForSequenceClassification.from_pretrained(saved, init_missing_head=True)
    assert model.classifier.out_proj.weight.shape == (2, 32)
    state = load_file(str(saved / "model.safetensors"))
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(
        LongdocError, match=r"lacks 1 encoder weights \(encoder\.layer\.1\.output\.dense\.weight"
    ):
        LongformerEncoder.from_pretrained(saved)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_window": 5}, r"attention_window\[0\] = 5"),
        ({"attention_window": [4, 6, 3]}, r"attention_window\[2\] = 3"),
        ({"attention_window": [4, 8]}, "attention_window has 2 values for 3 layers"),
        ({"attention_dilation": 0}, r"attention_dilation\[0\].*>= 1"),
        ({"attention_dilation": [1, 1]}, "attention_dilation has 2 values for 3 layers"),
        ({"attention_dilation": [1, [1, 2], 1]}, r"attention_dilation\[1\] has 2 values for 4 heads"),
        ({"attention_dilation": [1, [1, 2, 0, 1], 1]}, r"attention_dilation\[1\].*>= 1"),
        ({"hidden_size": 30}, "hidden_size 30 is not a multiple of num_attention_heads 4"),
        ({"position_style": "gpt"}, "position_style"),
    ],
)
def test_bad_config_fields(overrides, message, saved):
    with pytest.raises(LongdocError, match=message):
        LongformerConfig.from_dict({**TINY, **overrides})
    data = json.loads((saved / "config.json").read_text())  # the same through config.json
    (saved / "config.json").write_text(json.dumps({**data, **overrides}))
    with pytest.raises(LongdocError, match=message):
        load_hf_config(saved)


def test_input_longer_than_positions_and_qa_without_separator():
    model = LongformerForQuestionAnswering(LongformerConfig.from_dict(TINY)).eval()
    too_long = torch.full((1, 79), 5)
    too_long[0, 3] = SEP
    with pytest.raises(LongdocError, match="input has 79 tokens but the model's positions allow 78"):
        model(too_long)
    with pytest.raises(LongdocError, match="separator"):
        model(torch.full((1, 10), 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_fused_path_matches_hf(tmp_path, monkeypatch):
    """On CUDA the layers run compiled FlexAttention: same outputs and gradients as transformers."""
    from longdoc_cli import attention

    calls = []
    flex = attention.flex_local_attention
    monkeypatch.setattr(attention, "flex_local_attention", lambda *a: calls.append(1) or flex(*a))
    shape = dict(hidden_size=64, intermediate_size=128, attention_window=[64, 128, 64])
    shape["max_position_embeddings"] = 700
    hf = hf_model("encoder", seed=4, **shape)
    hf.save_pretrained(tmp_path)
    ours = LongformerEncoder.from_pretrained(tmp_path).cuda()
    hf = hf.cuda()
    ids, am, gm = (t.cuda() for t in batch(517))
    upstream = torch.randn(*ids.shape, 64, device="cuda") * am[..., None]
    a = outputs("encoder", ours, ids, am, gm, False)
    b = outputs("encoder", hf, ids, am, gm, True)
    assert_same_on_real(a, b, am, atol=1e-4)
    assert len(calls) == 3
    (a[0] * upstream).sum().backward()
    (b[0] * upstream).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if not name.startswith("pooler."):
            torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_in_place_activations_equal_the_functions(name):
    x = torch.randn(4, 7)
    assert torch.equal(IN_PLACE_ACTIVATIONS[name](x.clone()), ACTIVATIONS[name](x)), name


def test_saved_files_follow_the_umask(tmp_path):
    """safetensors writes 0600 and mkdtemp makes 0700: models must stay readable by other users."""
    import os
    import stat

    from longdoc_cli.runtime import umask_mode

    old = os.umask(0o022)
    try:
        torch.manual_seed(0)
        LongformerEncoder(
            LongformerConfig.from_dict(transformers.LongformerConfig(**TINY).to_dict())
        ).save_pretrained(tmp_path / "m")
        d = tmp_path / "d"
        d.mkdir(mode=0o700)
        umask_mode(d)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"hidden_size": "768"}, "hidden_size must be a positive integer"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"attention_window": "512"}, "attention_window must be an int or a list"),
        ({"hidden_size": 30}, "not a multiple of num_attention_heads"),
    ],
)
def test_bad_configs_are_longdoc_errors(changes, says):
    with pytest.raises(LongdocError, match=says):
        LongformerConfig(**changes)


@pytest.mark.parametrize("path", [123, None, "", "  "])
def test_from_pretrained_needs_a_path(path):
    with pytest.raises(LongdocError, match="expected a model directory path"):
        LongformerEncoder.from_pretrained(path)


def shared_global_weights(model) -> None:
    """The global projections made equal to the local ones (as in a converted BERT/RoBERTa)."""
    with torch.no_grad():
        for att in (layer.attention.self for layer in model.encoder.layer):
            for name in ("query", "key", "value"):
                getattr(att, name + "_global").load_state_dict(getattr(att, name).state_dict())


def shared_global_checkpoint(path, seed: int, **kw):
    """An HF encoder (``hf_model``'s ``kw``) with its global projections equal to the local ones,
    saved at ``path``; returned."""
    hf = hf_model("encoder", seed=seed, **kw)
    shared_global_weights(hf)
    hf.save_pretrained(path)
    return hf


def relative_error(got: torch.Tensor, want: torch.Tensor, am: torch.Tensor) -> float:
    """||got - want|| / ||want|| over the real (unpadded) tokens."""
    real = am.bool()
    return ((got - want)[real].norm() / want[real].norm()).item()


@pytest.mark.parametrize("shared", [True, False])
def test_global_rows_skipped_when_they_equal_the_local_ones(shared, tmp_path, monkeypatch):
    """Windows that fit in the band and global projections equal to the local ones: the global rows'
    own attention is not computed (it equals their local one) and the outputs still equal
    transformers' (fp32, padding, several globals); with other global weights it is computed."""
    import longdoc_cli.model as model_module

    hf = hf_model("encoder", seed=7, attention_window=[80, 80, 80])  # one-sided 40 >= 37 - 1
    if shared:
        shared_global_weights(hf)
    hf.save_pretrained(tmp_path)
    ours = LongformerEncoder.from_pretrained(tmp_path)
    calls = []
    real = model_module.longformer_attention
    monkeypatch.setattr(
        model_module, "longformer_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ids, am, gm = batch()
    with torch.no_grad():
        got = outputs("encoder", ours, ids, am, gm, False)
        assert len(calls) == (0 if shared else 3)
        assert_same_on_real(got, outputs("encoder", hf, ids, am, gm, True), am)
        ref = dense_reference_forward(ours, ids, am, gm)
    torch.testing.assert_close(got[0][am.bool()], ref[am.bool()], atol=1e-6, rtol=0)
    calls.clear()
    ours(ids, am, gm).sum().backward()  # with autograd the global weights get their own gradients
    assert len(calls) == 3
    assert ours.encoder.layer[0].attention.self.key_global.weight.grad is not None


def test_global_rows_computed_when_the_window_is_shorter_than_the_input(tmp_path):
    hf = shared_global_checkpoint(tmp_path, seed=8)  # windows 4, 8, 4 over 37 tokens
    ours = LongformerEncoder.from_pretrained(tmp_path)
    ids, am, gm = batch()
    assert not ours.encoder.layer[0].attention.self._global_rows_are_local(ids.shape[1])
    with torch.no_grad():
        assert_same_on_real(
            outputs("encoder", ours, ids, am, gm, False), outputs("encoder", hf, ids, am, gm, True), am
        )


def test_fused_linear_only_in_cpu_bf16_inference():
    """fp32, or bf16 with autograd: the module itself, bit for bit; CPU bf16 inference: oneDNN's
    fused kernel where it runs, within bf16 rounding of the unfused path, every activation."""
    from longdoc_cli.model import FUSED_ACTIVATIONS, fused_linear_available, linear

    torch.manual_seed(9)
    module = torch.nn.Linear(48, 40)
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        for act in [None, *sorted(ACTIVATIONS)]:
            want = module(x) if act is None else ACTIVATIONS[act](module(x))
            assert torch.equal(linear(x, module, act), want), act
    low, xl = module.to(torch.bfloat16), x.to(torch.bfloat16)
    y = linear(xl, low, "gelu")  # autograd on: not fused, the plain functions
    assert torch.equal(y, ACTIVATIONS["gelu"](low(xl)))
    if not fused_linear_available():
        pytest.skip("no oneDNN bf16 fused linear on this CPU")
    with torch.inference_mode():
        for act in [None, *sorted(FUSED_ACTIVATIONS)]:
            want = (low(xl) if act is None else ACTIVATIONS[act](low(xl))).float()
            got = linear(xl, low, act)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02, msg=str(act))
        enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False  # the user's switch
        try:
            assert torch.equal(linear(xl, low, "gelu"), ACTIVATIONS["gelu"](low(xl)))
        finally:
            torch.backends.mkldnn.enabled = enabled


def test_bf16_inference_close_to_fp32_with_shared_global_weights(tmp_path):
    """CPU bf16 inference (the fused linears and q/k/v in one matmul where oneDNN runs, the global
    rows skipped) stays within bf16 rounding of fp32, window in band and not."""
    for window in ([4, 8, 4], [80, 80, 80]):
        shared_global_checkpoint(tmp_path / str(window[0]), seed=10, attention_window=window)
        ours = LongformerEncoder.from_pretrained(tmp_path / str(window[0]))
        ids, am, gm = batch()
        with torch.inference_mode():
            ref = ours(ids, am, gm)
            low = ours.to(torch.bfloat16)(ids, am, gm).float()
        rel = relative_error(low, ref, am)
        assert rel < 1e-2, (window, rel)


def test_inference_caches_follow_weight_changes(tmp_path):
    """The q/k/v weights concatenated for the fused matmul, and the check that the global projections
    equal the local ones, are redone when a weight changes in place."""
    shared_global_checkpoint(tmp_path, seed=11, attention_window=[80, 80, 80])
    ids, am, gm = batch()
    ref_model = LongformerEncoder.from_pretrained(tmp_path)
    with torch.no_grad():
        ref_model.encoder.layer[1].attention.self.value.weight.mul_(0.5)
        ref = dense_reference_forward(ref_model, ids, am, gm)
    for dtype in (torch.float32, torch.bfloat16):
        model = LongformerEncoder.from_pretrained(tmp_path).to(dtype)
        layer = model.encoder.layer[1].attention.self
        with torch.inference_mode():
            model(ids, am, gm)
            assert layer._global_rows_are_local(ids.shape[1])
        with torch.no_grad():
            layer.value.weight.mul_(0.5)
        with torch.inference_mode():
            assert not layer._global_rows_are_local(ids.shape[1])
            got = model(ids, am, gm).float()
        rel = relative_error(got, ref, am)
        assert rel < (1e-6 if dtype == torch.float32 else 1e-2), (dtype, rel)


def test_weights_made_under_inference_mode(tmp_path):
    """Weights created under inference_mode keep no version counter: nothing is cached for them, and
    a change in place (allowed there) still counts."""
    shared_global_checkpoint(tmp_path, seed=12, attention_window=[80, 80, 80])
    ids, am, gm = batch()
    ref_model = LongformerEncoder.from_pretrained(tmp_path)
    with torch.no_grad():
        ref = dense_reference_forward(ref_model, ids, am, gm)
        ref_model.encoder.layer[2].attention.self.query.weight.mul_(0.5)
        changed = dense_reference_forward(ref_model, ids, am, gm)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        with torch.inference_mode():
            model = LongformerEncoder.from_pretrained(tmp_path).to(dtype)
            model = model.to(torch.float64).to(dtype)  # inference tensors
            assert model.encoder.layer[2].attention.self.query.weight.is_inference()
            for want in (ref, changed):
                got = model(ids, am, gm).float()
                rel = relative_error(got, want, am)
                assert rel < tol, (dtype, rel)
                model.encoder.layer[2].attention.self.query.weight.mul_(0.5)


def test_short_sequences_train_in_bf16_close_to_float64(tmp_path, monkeypatch):
    """A bf16 training step of windows on the short path (its local rows and global rows through
    _FlashFp32Backward, the attention's backward in fp32): every parameter's gradient within bf16
    precision of the float64 one, and no further from it than with the stock bf16 kernel."""
    from longdoc_cli import attention

    hf = hf_model("encoder", seed=8, attention_window=[64, 128, 64]).double()
    hf.save_pretrained(tmp_path)
    ids, am, gm = batch()
    upstream = torch.randn(*ids.shape, TINY["hidden_size"], dtype=torch.float64) * am[..., None]

    def grads(dtype):
        model = LongformerEncoder.from_pretrained(tmp_path).to(dtype)
        params = dict(model.named_parameters())
        out = model(ids, am, gm)
        got = torch.autograd.grad((out.double() * upstream).sum(), list(params.values()), allow_unused=True)
        return {k: g for k, g in zip(params, got, strict=True) if not k.startswith("pooler.")}

    want = grads(torch.float64)
    calls = []
    apply = attention._FlashFp32Backward.apply
    monkeypatch.setattr(attention._FlashFp32Backward, "apply", lambda *a: calls.append(1) or apply(*a))
    got = grads(torch.bfloat16)
    assert len(calls) == 3  # the local rows of each layer (the global rows: attention._GlobalRows)
    monkeypatch.setattr(attention, "_fp32_backward_applies", lambda *a: False)
    stock = grads(torch.bfloat16)
    for name, w in want.items():
        if name.endswith(("key.bias", "key_global.bias")):  # 0 in exact arithmetic (softmax's shift)
            continue
        err = ((got[name].double() - w).norm() / w.norm()).item()
        stock_err = ((stock[name].double() - w).norm() / w.norm()).item()
        assert err < 5e-2 and err <= 1.1 * stock_err + 1e-3, (name, err, stock_err)
