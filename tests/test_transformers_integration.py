"""attnspec.integrations.transformers: tiny models built from configs (random weights, no
downloads) of each decoder family it claims, against transformers' own sdpa attention."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import attnspec  # noqa: E402
import attnspec.integrations.transformers as ats  # noqa: E402
from attnspec.layers.torch import project_spans, span_regularisation  # noqa: E402

VOCAB = 48
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)


def _config(family, **extra):
    if family == "llama":
        return transformers.LlamaConfig(**SMALL, **extra)
    if family == "qwen2":
        return transformers.Qwen2Config(**SMALL, **extra)
    if family == "qwen3":
        return transformers.Qwen3Config(**SMALL, head_dim=8, **extra)
    if family == "mistral":  # a window shorter than the inputs: the hard window z = W - 1, R = 1
        return transformers.MistralConfig(**SMALL, sliding_window=4, **extra)
    if family == "gemma":
        return transformers.GemmaConfig(**SMALL, head_dim=8, **extra)
    if family == "phi3":
        return transformers.Phi3Config(**SMALL, pad_token_id=0, **extra)
    if family == "qwen2-mixed":  # layers of both kinds: full attention, a window of 6, full attention
        return transformers.Qwen2Config(**dict(SMALL, num_hidden_layers=3), use_sliding_window=True, sliding_window=6,
                                        layer_types=["full_attention", "sliding_attention", "full_attention"], **extra)
    others = dict(olmo2=transformers.Olmo2Config, granite=transformers.GraniteConfig,
                  mixtral=transformers.MixtralConfig)
    return others[family](**SMALL, **extra)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "olmo2", "granite", "mixtral"]


def _batch(seed=0, B=3, L=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :4] = 0  # left padding, as batched generation pads
    mask[1, :1] = 0
    return ids, mask


def _pair(family, **settings):
    """(sdpa model, attnspec model) with the same weights, in eval mode."""
    torch.manual_seed(0)
    cfg = _config(family)
    sdpa = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    cfg2 = _config(family)
    if settings:
        ats.configure(cfg2, **settings)
    model = transformers.AutoModelForCausalLM.from_config(cfg2, attn_implementation="attnspec").eval()
    missing, unexpected = model.load_state_dict(sdpa.state_dict(), strict=False)
    assert not unexpected and all(".attnspec." in name for name in missing)
    return sdpa, model


@pytest.fixture
def calls(monkeypatch):
    """Counts the attnspec.attention calls the models make (so a test cannot pass on sdpa)."""
    seen = []
    original = attnspec.attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(ats.attnspec, "attention", spy)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_sdpa_on_a_left_padded_batch(family, calls):
    sdpa, model = _pair(family)
    ids, mask = _batch()
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4
    assert len(calls) == 2 and all(c["key_padding_mask"] is not None for c in calls)
    if family == "mistral":
        assert all(c["span"] == 3.0 and c["ramp"] == 1.0 for c in calls)


@pytest.mark.parametrize("settings", [{}, dict(max_span=3.0, span_init=0.5, ramp=2.0),
                                      dict(alpha=1.5, learn_alpha=True),
                                      dict(alpha=1.3, learn_alpha=True, max_span=5.0, span_init=0.6, ramp=1.5)])
def test_greedy_generation_with_the_cache_equals_without(settings):
    _, model = _pair("llama", **settings)
    ids, mask = _batch(1, L=7)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (3, 13)
    assert torch.equal(cached, uncached)


def test_learned_alpha_and_span_train():
    """A few optimiser steps on a repeating corpus lower the loss; alpha and span get gradients."""
    _, model = _pair("llama", alpha=1.5, learn_alpha=True, max_span=8.0, span_init=0.5, ramp=2.0)
    model.train()
    text = torch.arange(64) % 7
    ids = text.view(4, 16)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        total = loss + span_regularisation(model, 1e-4)
        optimiser.zero_grad()
        total.backward()
        heads = [m.attnspec for m in ats.attention_layers(model)]
        assert all(h.alpha_logit.grad.abs().sum() > 0 and h.span_theta.grad.abs().sum() > 0 for h in heads)
        optimiser.step()
        project_spans(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(((h.span_theta >= 0) & (h.span_theta <= 1)).all() for h in heads)


def test_save_and_load_round_trip_alpha_and_span(tmp_path):
    _, model = _pair("qwen3", alpha=1.4, learn_alpha=True, max_span=6.0, span_init=0.25)
    with torch.no_grad():
        for i, module in enumerate(ats.attention_layers(model)):
            module.attnspec.span_theta.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]) + 0.05 * i)
            module.attnspec.alpha_logit.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]) * (i + 1))
    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config._attn_implementation == "attnspec"
    for a, b in zip(ats.attention_layers(model), ats.attention_layers(loaded)):
        assert torch.equal(a.attnspec.span_theta, b.attnspec.span_theta)
        assert torch.equal(a.attnspec.alpha_logit, b.attnspec.alpha_logit)
        assert b.attnspec.max_span == 6.0
    ids, mask = _batch(2)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids, attention_mask=mask).logits,
                           loaded.eval()(input_ids=ids, attention_mask=mask).logits)


def test_add_heads_to_an_existing_model():
    sdpa, _ = _pair("llama")
    ids, mask = _batch(3)
    with torch.no_grad():
        before = sdpa(input_ids=ids, attention_mask=mask).logits
    model = ats.add_heads(sdpa, alpha=1.0, max_span=1000.0, span_init=1.0)  # a span beyond the input: no change
    assert model.config._attn_implementation == "attnspec"
    assert len(list(ats.attention_layers(model))) == 2
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert (after - before)[mask.bool()].abs().max().item() <= 1e-4


def test_what_attnspec_cannot_express_is_refused():
    _, model = _pair("llama")
    ids, mask = _batch()
    model.config.attention_dropout = 0.1
    for module in ats.attention_layers(model):
        module.attention_dropout = 0.1
    model.train()
    with pytest.raises(NotImplementedError, match="no attention dropout; got dropout=0.1 while training"):
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    bias = torch.zeros(3, 1, 11, 11)
    with pytest.raises(NotImplementedError, match="an arbitrary 4-D mask or bias"):
        model(input_ids=ids, attention_mask=bias)
    torch.manual_seed(0)
    cfg = ats.configure(_config("mistral"), max_span=8.0)
    windowed = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(NotImplementedError, match="sliding window of 4 tokens and a learned span"):
        windowed(input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match="unknown attnspec settings"):
        ats.configure(_config("llama"), spam=1)


@pytest.mark.parametrize("settings", [dict(max_span=3.0, span_init=0.5, ramp=2.0),
                                      dict(alpha=1.3, learn_alpha=True, max_span=4.0, span_init=0.6, ramp=1.5)])
def test_span_trimmed_cache_generates_the_same_tokens_and_stays_bounded(settings):
    from transformers.cache_utils import DynamicSlidingWindowLayer

    _, model = _pair("llama", **settings)
    ids, mask = _batch(4, L=7)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cache = ats.span_cache(model)
    bounds = [m.attnspec.cache_bound() for m in ats.attention_layers(model)]
    assert max(bounds) < 7 and all(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)
    with torch.no_grad():
        trimmed = model.generate(ids, cache=cache, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(trimmed, uncached)
    assert [layer.keys.shape[2] for layer in cache.layers] == [b - 1 for b in bounds]


@pytest.mark.parametrize("thetas", [(0.1, 0.9), (0.9, 0.1)])
def test_span_cache_keeps_each_layers_own_bound(thetas):
    """Layers with different spans keep different numbers of keys (the longer first or last)."""
    _, model = _pair("llama", alpha=1.4, learn_alpha=True, max_span=6.0, span_init=0.5, ramp=1.5)
    with torch.no_grad():
        for layer, theta in zip(ats.attention_layers(model), thetas):
            layer.attnspec.span_theta.copy_(torch.tensor([theta, theta / 2, theta, theta / 3]))
    bounds = [m.attnspec.cache_bound() for m in ats.attention_layers(model)]
    assert bounds[0] != bounds[1]
    ids, mask = _batch(5, L=9)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cache = ats.span_cache(model)
    with torch.no_grad():
        trimmed = model.generate(ids, cache=cache, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(trimmed, uncached)
    assert [layer.keys.shape[2] for layer in cache.layers] == [b - 1 for b in bounds]
    # Without a span nothing can be dropped.
    _, plain = _pair("llama")
    assert not any(layer.is_sliding for layer in ats.span_cache(plain).layers)


def test_the_finetune_example_runs(tmp_path, capsys):
    """examples/transformers_finetune.py at a tiny size: it trains, reports alpha and span per
    layer and head, and draws them."""
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "transformers_finetune.py"
    spec = importlib.util.spec_from_file_location("transformers_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--pretrain-steps", "2", "--steps", "2", "--context", "16", "--batch", "2", "--width", "16",
                           "--heads", "2", "--layers", "1", "--eval-chars", "64", "--max-span", "8", "--ramp", "2",
                           "--plot", str(tmp_path / "spans.png")])
    assert (tmp_path / "spans.png").stat().st_size > 0
    (layer, alpha, span), = result["rows"]
    assert alpha.shape == (2,) and span.shape == (2,) and ((alpha > 1) & (alpha < 2)).all()
    assert "layer 0: alpha [" in capsys.readouterr().out


def test_the_bench_measures_every_arm_against_sdpa(tmp_path):
    from attnspec.bench import transformers_bench

    rows = transformers_bench.run(["--length", "16", "--decode", "3", "--layers", "1", "--width", "16", "--heads",
                                    "2", "--kv-heads", "1", "--repeats", "1", "--json", str(tmp_path / "t.json")])
    assert [r["arm"] for r in rows] == list(transformers_bench.ARMS)
    assert rows[0]["prefill_vs_sdpa"] == 1.0
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    import json

    result = json.loads((tmp_path / "t.json").read_text())
    assert result["rows"] == rows and result["environment"]["transformers"] == transformers.__version__
    assert result["command"].startswith("python -m attnspec.bench.transformers_bench --length 16")
    report = (tmp_path / "t.md").read_text()
    assert result["command"] in report and "| attnspec alpha=1.5 |" in report
    assert transformers_bench.main(["--length", "8", "--decode", "1", "--layers", "1", "--width", "16", "--heads", "2",
                                    "--kv-heads", "1", "--repeats", "1", "--arms", "sdpa"]) == 0  # an exit status


def test_heads_missing_from_a_checkpoint_start_at_their_initial_values(tmp_path):
    sdpa, _ = _pair("llama")
    sdpa.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    ats.configure(config, alpha=1.5, learn_alpha=True, max_span=8.0, span_init=0.25)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert info["missing_keys"] and all(".attnspec." in k for k in info["missing_keys"])
    for layer in ats.attention_layers(model):
        assert torch.equal(layer.attnspec.span_theta, torch.full((4,), 0.25))
        assert torch.equal(layer.attnspec.alpha_logit, torch.zeros(4))  # alpha = 1 + sigmoid(0) = 1.5
    assert torch.equal(model.model.embed_tokens.weight, sdpa.model.embed_tokens.weight)
    # A fixed span per layer and head (a buffer) starts at its values too.
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    ats.configure(config, max_span=8.0, span_init=[[0.25, 0.5, 0.75, 1.0], 0.5], learn_span=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, config=config)
    first, second = [layer.attnspec.span_theta for layer in ats.attention_layers(model)]
    assert torch.equal(first, torch.tensor([0.25, 0.5, 0.75, 1.0])) and torch.equal(second, torch.full((4,), 0.5))


# --- alpha and span per layer and head ---------------------------------------------------------

PER_LAYER_AND_HEAD = dict(alpha=[[1.0, 1.5, 1.5, 2.0], 1.3], max_span=[6.0, None],
                          span_init=[[0.2, 0.4, 0.6, 0.8], 0.0], ramp=[1.5, 32.0], learn_span=False)


def test_fixed_alpha_and_span_per_layer_and_head_reach_the_attention_and_round_trip(tmp_path, calls):
    _, model = _pair("llama", **PER_LAYER_AND_HEAD)
    first, second = [layer.attnspec for layer in ats.attention_layers(model)]
    assert first.fixed_alpha == (1.0, 1.5, 1.5, 2.0) and second.fixed_alpha == 1.3
    assert torch.equal(first.span_theta, torch.tensor([0.2, 0.4, 0.6, 0.8])) and first.max_span == 6.0
    assert not first.span_theta.requires_grad and second.span is None
    names = [name for name, _ in model.named_parameters()]
    assert "model.layers.0.self_attn.attnspec.span_theta" in model.state_dict()
    assert "model.layers.0.self_attn.attnspec.span_theta" not in names  # a fixed span is not trained
    ids, mask = _batch(6)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert [c["ramp"] for c in calls] == [1.5, 32.0]
    assert torch.equal(calls[0]["alpha"], torch.tensor([1.0, 1.5, 1.5, 2.0])) and calls[1]["alpha"] == 1.3
    assert torch.equal(calls[0]["span"], first.span) and calls[1]["span"] is None

    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.attnspec == dict(ats.DEFAULTS, **PER_LAYER_AND_HEAD)
    a, b = [layer.attnspec for layer in ats.attention_layers(loaded)]
    assert a.fixed_alpha == first.fixed_alpha and b.fixed_alpha == second.fixed_alpha
    assert torch.equal(a.span_theta, first.span_theta) and not a.span_theta.requires_grad and b.span is None
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("settings, message", [
    (dict(alpha=[1.5, 1.5, 1.5]), r"alpha=\[1.5, 1.5, 1.5\]: a list gives one entry per layer and the model has "
                                  r"num_hidden_layers=2; got 3 entries"),
    (dict(alpha=[1.2, 1.3, 1.4, 1.5]), r"got 4 entries \(one value per head in every layer is "
                                       r"\[\[1.2, 1.3, 1.4, 1.5\]\] \* 2\)"),
    (dict(alpha=[[1.0, 1.5], 1.0]), r"layer 0 .*num_attention_heads=4.*alpha=\[1.0, 1.5\] must be a number or "
                                    r"n_heads=4 numbers \(one per head\); got shape \[2\]"),
    (dict(alpha=[1.0, [1.0, 0.5, 1.0, 1.0]]), r"layer 1 .*alpha=\[1.0, 0.5, 1.0, 1.0\] must lie in \[1, 2\]"),
    (dict(alpha=float("nan")), r"layer 0 .*alpha=nan must lie in \[1, 2\]"),
    (dict(alpha=[1.0, float("inf")]), r"layer 1 .*alpha=inf must lie in \[1, 2\]"),
    (dict(alpha=[1.5, [1.2, 1.0, 1.5, 1.5]], learn_alpha=True), r"layer 1 .*initial alpha in \(1, 2\)"),
    (dict(max_span=[[4.0, 4.0], None]), r"max_span\[0\]=\[4.0, 4.0\]: max_span takes one value per layer"),
    (dict(max_span=[float("nan"), None]), r"layer 0 .*max_span=nan must be a finite number > 0"),
    (dict(max_span=8.0, span_init=[0.5, [0.1, 0.2, 0.3, 1.5]]), r"layer 1 .*span_init=\[0.1, 0.2, 0.3, 1.5\] "
                                                                 r"must lie in \[0, 1\]"),
    (dict(ramp=[1.0, -2.0]), r"layer 1 .*ramp=-2.0 must be a finite number > 0"),
])
def test_bad_per_layer_settings_name_the_setting_and_value(settings, message):
    config = _config("llama")
    with pytest.raises(ValueError, match=message):
        ats.configure(config, **settings)
    assert getattr(config, "attnspec", None) is None  # a refused setting is not recorded


def test_tensor_settings_are_recorded_as_lists():
    config = ats.configure(_config("llama"), alpha=torch.tensor([[1.0, 1.5, 1.5, 2.0], [1.2, 1.2, 1.2, 1.2]]))
    assert config.attnspec["alpha"] == [[1.0, 1.5, 1.5, 2.0], [1.2000000476837158] * 4]
    assert config.to_json_string()  # config.json can hold it


# --- span_cache on models with windows and layers without a span ------------------------------

def _kept(cache):
    return [layer.keys.shape[2] for layer in cache.layers]


@pytest.mark.parametrize("family, settings, window_layers", [
    ("llama", dict(max_span=[None, 3.0], span_init=0.5, ramp=1.5), []),  # the layer that reads everything first
    ("llama", dict(max_span=[3.0, None], span_init=0.5, ramp=1.5), []),  # ... and last
    ("mistral", {}, [0, 1]),  # windows only (W = 4): what transformers' own cache keeps
    ("qwen2-mixed", dict(max_span=[5.0, None, None], span_init=0.4, ramp=1.5), [1]),
    ("qwen2-mixed", dict(max_span=[6.0, None, 6.0], span_init=[0.3, 0.0, 0.9], ramp=1.5), [1]),
])
def test_span_cache_keeps_what_each_layer_can_read(family, settings, window_layers):
    _, model = _pair(family, **settings)
    ids, mask = _batch(7, L=9)
    new = 8
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    cache = ats.span_cache(model)
    with torch.no_grad():
        trimmed = model.generate(ids, cache=cache, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(trimmed.sequences, uncached.sequences)
    for a, b in zip(trimmed.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    expected = []
    for i, layer in enumerate(ats.attention_layers(model)):
        heads = getattr(layer, "attnspec", None)
        bound = None if heads is None else heads.cache_bound()
        if i in window_layers:
            expected.append(model.config.sliding_window - 1)
        elif bound is not None:
            expected.append(bound - 1)
        else:
            expected.append(9 + new - 1)  # everything (the last token is never fed back)
    assert _kept(cache) == expected
    assert min(expected) < 9 + new - 1  # something was dropped


def test_span_cache_sizes_each_mask_by_its_widest_layer():
    _, model = _pair("qwen2-mixed", max_span=[6.0, None, 6.0], span_init=[0.3, 0.0, 0.9], ramp=1.5)
    cache = ats.span_cache(model)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
    full_0, _, full_2 = [layer.attnspec.cache_bound() for layer in ats.attention_layers(model)]
    assert full_0 < full_2 and cache.is_sliding == [False, True, False]
    assert cache.get_mask_sizes(1, 0) == (full_2, 12 - (full_2 - 1))  # layer 2's keys: the longer of the two
    assert cache.get_mask_sizes(1, 1) == (6, 12 - 5)  # the window's


# --- a config with attnspec settings runs attnspec, or refuses ---------------------------------

def test_a_config_with_attnspec_settings_refuses_another_implementation(tmp_path):
    config = ats.configure(_config("llama"), alpha=1.5, max_span=8.0, span_init=0.5)
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa' was requested for a LlamaForCausalLM whose "
                                         r"config carries attnspec settings .*Request 'attnspec' \(or nothing\)"):
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert config._attn_implementation == "attnspec"  # the refused request is not left in the config
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.config._attn_implementation == "attnspec"
    with pytest.raises(ValueError, match="attn_implementation='eager' was requested"):
        model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "attnspec"
    model.save_pretrained(tmp_path)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "attnspec"
    with pytest.raises(ValueError, match="attn_implementation='sdpa' was requested"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    # Without the settings, nothing changes: the default stays sdpa, and no heads are added.
    plain = _config("llama")
    for requested in (None, "sdpa", "eager"):
        kwargs = {} if requested is None else dict(attn_implementation=requested)
        other = transformers.AutoModelForCausalLM.from_config(plain, **kwargs)
        assert other.config._attn_implementation == (requested or "sdpa")
        assert not any(hasattr(layer, "attnspec") for layer in ats.attention_layers(other))
    del config.attnspec  # what the message suggests
    assert transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").config._attn_implementation == "sdpa"
