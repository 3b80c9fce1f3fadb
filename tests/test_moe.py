"""Mixture-of-experts: the model (router, balancing and z-losses, per-expert counts), its export to transformers'
Mixtral / Qwen3-MoE with equal logits and equal balancing loss, and the moe_experts op's reference."""

from __future__ import annotations

import pytest
import torch

from sparrow import ops
from sparrow.model import SparrowConfig, SparrowForCausalLM, router_losses
from sparrow.train.config import Config
from sparrow.train.trainer import build_optimizer

from conftest import assert_compiled_matches_eager

SMALL_MOE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=24, model_type="mixtral")


def small_model(seed: int = 0, **overrides) -> SparrowForCausalLM:
    torch.manual_seed(seed)
    return SparrowForCausalLM(SparrowConfig(**{**SMALL_MOE, **overrides}), backend="reference")


def tokens(n: int = 2, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def test_moe_presets_state_their_sizes():
    tiny = SparrowConfig.from_preset("moe-tiny")
    assert tiny.num_parameters() == sum(p.numel() for p in SparrowForCausalLM(tiny).parameters())
    assert tiny.num_parameters(active=True) < tiny.num_parameters()
    big = SparrowConfig.from_preset("moe-500m")
    assert 150e6 < big.num_parameters(active=True) < 160e6 and 490e6 < big.num_parameters() < 500e6


def test_moe_loss_adds_weighted_router_losses_and_counts_every_assignment():
    model = small_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    ids = tokens()
    out = model(ids, labels=ids)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    assert out.expert_counts.shape == (2, 4)
    assert out.expert_counts.sum(1).tolist() == [ids.numel() * 2] * 2
    assert out.aux_loss.item() >= 2.0 - 1e-5  # E * sum f_e P_e >= k, equal only when perfectly balanced
    with torch.no_grad():  # evaluation: the loss is the cross-entropy alone; the router losses still come back
        evaluated = model.eval()(ids, labels=ids)
    torch.testing.assert_close(evaluated.loss, ce.detach())
    torch.testing.assert_close(evaluated.aux_loss, out.aux_loss.detach())
    out.loss.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_balancing_loss_gradient_is_switch_form_by_hand():
    """d aux / d z_tj of E * sum_e f_e * mean_t p_te, averaged over L layers, is E / (T L) * p_tj (f_j - sum_e f_e p_te)
    with f counted over every top-k slot and held constant: what a detached probability, a missing layer, a
    gradient through f or only the first slot counted would each change."""
    torch.manual_seed(0)
    layers, t, e, k = 3, 20, 5, 2
    logits = (2 * torch.randn(layers, t, e)).requires_grad_(True)
    aux, _, counts = router_losses(list(logits.unbind(0)), k)
    aux.backward()
    p = torch.softmax(logits.detach(), -1)
    f = torch.zeros(layers, e).scatter_add_(1, p.topk(k, -1).indices.flatten(1), torch.ones(layers, t * k)) / t
    assert counts.tolist() == (f * t).long().tolist()
    torch.testing.assert_close(aux, (e * (f * p.mean(1)).sum(-1)).mean())
    expected = e / (t * layers) * p * (f[:, None, :] - (f[:, None, :] * p).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected)


def test_balancing_loss_alone_revives_a_starved_expert():
    """A toy router whose input is mostly one shared direction, pointed so that expert 0 gets no token: gradient
    steps on the balancing loss alone bring every expert to an even share."""
    g = torch.Generator().manual_seed(0)
    t, h, e, k = 512, 16, 4, 2
    common = torch.randn(h, generator=g)
    x = common + 0.5 * torch.randn(t, h, generator=g)
    w = 0.1 * torch.randn(e, h, generator=g)
    w[0] -= 0.5 * common / common.norm()
    w.requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=0.03)
    _, _, start = router_losses([x @ w.t()], k)
    assert start[0, 0] == 0
    for _ in range(20):
        aux, _, counts = router_losses([x @ w.t()], k)
        optimizer.zero_grad()
        aux.backward()
        optimizer.step()
    _, _, end = router_losses([x @ w.t()], k)
    assert end.max() / end.min() < 1.1 and aux.item() < 2.01


def test_routers_train_at_their_own_learning_rate():
    config = Config()
    config.train.lr, config.train.router_lr_scale = 2e-3, 0.05
    model = small_model()
    groups = build_optimizer(model, config, torch.device("cpu")).param_groups
    routers = {id(layer.mlp.gate.weight) for layer in model.model.layers}
    assert [{id(p) for p in g["params"]} & routers for g in groups] == [set(), set(), routers]
    assert groups[2]["lr"] == pytest.approx(1e-4) and groups[0]["lr"] == 2e-3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    config.train.router_lr_scale = -1.0
    with pytest.raises(ValueError, match="train.router_lr_scale"):
        config.validate()


def test_moe_layer_placement_follows_qwen3_moe_rules():
    config = SparrowConfig(**{**SMALL_MOE, "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3],
                              "model_type": "qwen3_moe", "qk_norm": True})
    assert [config.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    model = SparrowForCausalLM(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("field, value", [("num_experts_per_tok", 5), ("mlp_only_layers", [7]),
                                          ("router_aux_loss_coef", -1.0), ("num_local_experts", -2)])
def test_bad_moe_config_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SparrowConfig(**{**SMALL_MOE, field: value})


def test_moe_export_refuses_what_mixtral_cannot_hold(tmp_path):
    model = small_model(norm_topk_prob=False)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="num_local_experts"):
        SparrowForCausalLM(SparrowConfig(**{**SMALL_MOE, "model_type": "llama"})).save_pretrained(tmp_path / "d")


@pytest.mark.parametrize("overrides", [{}, dict(model_type="qwen3_moe", qk_norm=True, norm_topk_prob=False,
                                                mlp_only_layers=[1], tie_word_embeddings=True)])
def test_sparrow_moe_exports_to_transformers_with_equal_logits_and_balancing_loss(overrides, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = small_model(**overrides).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped weight could not hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[model.config.model_type]
    ids = tokens()
    with torch.no_grad():
        ours = model(ids, labels=ids)
        theirs = hf(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
    # transformers sums over the concatenated layers; Sparrow averages its per-layer losses (see router_losses):
    # transformers' function applied to each layer alone gives Sparrow's terms.
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    per_layer = [load_balancing_loss_func((r,), 4, 2) for r in theirs.router_logits if r is not None]
    torch.testing.assert_close(ours.aux_loss, torch.stack(per_layer).mean(), atol=1e-5, rtol=1e-5)
    if len(per_layer) == 1:
        torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, atol=1e-5, rtol=1e-5)
    reloaded = SparrowForCausalLM.from_pretrained(tmp_path / "out", backend="reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours.logits, atol=0, rtol=0)


def moe_inputs(tokens_: int = 10, hidden: int = 8, inter: int = 6, experts: int = 4, k: int = 2, dtype=torch.float32,
               seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens_, hidden, generator=g).to(device, dtype)
    logits = torch.randn(tokens_, experts, generator=g)
    weights, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(device, dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(device, dtype)
    return x, ids.to(device), weights.to(device, dtype), w_gate_up, w_down


def test_moe_experts_reference_equals_per_token_sum():
    x, ids, weights, w_gate_up, w_down = moe_inputs()
    out = ops.moe_experts(x, ids, weights, w_gate_up, w_down, backend="reference")
    inter = w_down.shape[-1]
    for t in range(x.shape[0]):
        expected = torch.zeros(x.shape[1])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = w_gate_up[e] @ x[t]
            expected += weights[t, j] * (w_down[e] @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:]))
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arg, bad, match", [
    ("topk_ids", lambda a: a.float(), "topk_ids"),
    ("topk_ids", lambda a: a + 10, "expert ids must lie"),
    ("topk_ids", lambda a: a - 10, "expert ids must lie"),
    ("topk_weights", lambda a: a[:, :1], "topk_weights"),
    ("w_down", lambda a: a[:, :, :-1], "w_down"),
    ("w_gate_up", lambda a: a.double(), "w_gate_up"),
])
def test_moe_experts_bad_argument_is_named(arg, bad, match):
    names = ("x", "topk_ids", "topk_weights", "w_gate_up", "w_down")
    args = dict(zip(names, moe_inputs()))
    args[arg] = bad(args[arg])
    with pytest.raises(ValueError, match=match):
        ops.moe_experts(**args)


def test_dpo_and_sft_losses_train_an_moe_model_unchanged():
    """Post-training needs nothing MoE-specific: DPO starts at ln 2 and raises the margin, and the SFT loss (the
    causal-LM objective on masked labels) carries the router losses."""
    import math

    from sparrow.post_training.losses import DPOObjective, pad_right
    from sparrow.train.trainer import CausalLMObjective

    policy = small_model(seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 96, (n,), generator=g).tolist() for n in (4, 6, 3)]
    chosen = [torch.randint(5, 96, (n,), generator=g).tolist() for n in (3, 5, 4)]
    rejected = [torch.randint(5, 96, (n,), generator=g).tolist() for n in (6, 2, 3)]
    batch = {}
    for side, answers in (("chosen", chosen), ("rejected", rejected)):
        batch[f"{side}_input_ids"] = pad_right([p + a for p, a in zip(prompts, answers)], 0)
        batch[f"{side}_labels"] = pad_right([[-100] * len(p) + a for p, a in zip(prompts, answers)], -100)
    objective = DPOObjective.from_policy(policy, beta=0.5)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss, metrics = objective.loss(policy, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.05 and metrics["rewards/margin"] > 0
    sft_loss, sft_metrics = CausalLMObjective().loss(policy, {"input_ids": batch["chosen_input_ids"],
                                                             "labels": batch["chosen_labels"]})
    assert sft_loss.requires_grad and sft_metrics["aux_loss"] > 0
    assert sum(sft_metrics[f"expert_tokens/{e}"] for e in range(4)) == batch["chosen_input_ids"].numel() * 2 * 2


def test_moe_reference_compiles_in_one_graph_with_the_eager_result():
    """Eager runs each expert on its own tokens; compiled runs the shape-static masked form. Same numbers."""
    x, ids, weights, w_gate_up, w_down = moe_inputs(tokens_=12)

    def f(x, weights, w_gate_up, w_down):
        return ops.moe_experts(x, ids, weights, w_gate_up, w_down, backend="reference").square().sum()

    assert_compiled_matches_eager(f, (x, weights, w_gate_up, w_down), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_moe_loss_and_router_gradient():
    ids = tokens()
    grads = []
    for checkpointing in (False, True):
        model = small_model(router_z_loss_coef=0.1)
        model.model.gradient_checkpointing = checkpointing
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), model.model.layers[1].mlp.gate.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=0, rtol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-6)
