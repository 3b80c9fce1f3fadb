import math

import pytest
import torch
from conftest import ByteTokenizer

from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.post_training.losses import (
    DPOObjective,
    RewardObjective,
    bradley_terry_loss,
    dpo_loss,
    pad_right,
    precompute_reference,
    sequence_logprobs,
)
from sparrow.post_training.reward_model import RewardModel


def logsig(x):
    return -math.log1p(math.exp(-x))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return SparrowForCausalLM(SparrowConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=2,
                                                        max_position_embeddings=64), backend="reference")


def test_sequence_logprobs_sums_only_labelled_positions():
    # Vocab of 2. Position 0's logits (0, ln 3) predict token 1 with p = 3/4; position 1's (ln 4, 0) predict
    # token 0 with p = 4/5; position 2 predicts a -100 label and must not count.
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(4), 0.0], [5.0, -5.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 0, -100]])
    expected = math.log(3 / 4) + math.log(4 / 5)
    assert sequence_logprobs(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_dpo_sigmoid_loss_with_label_smoothing_matches_hand_computation():
    # D = (pi_c - ref_c) - (pi_r - ref_r) = (-10 + 11) - (-12 + 11.5) = 1.5
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    beta, eps = 0.1, 0.1
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    expected = -(1 - eps) * logsig(0.15) - eps * logsig(-0.15)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.1)
    assert metrics["rewards/rejected"] == pytest.approx(-0.05)
    assert metrics["rewards/margin"] == pytest.approx(0.15)
    assert metrics["rewards/accuracy"] == 1.0


def test_dpo_matches_trl_formula_per_pair_and_averages():
    # TRL: logits = (pi_c - pi_r) - (ref_c - ref_r); loss = -logsig(b*logits)(1-e) - logsig(-b*logits) e
    pc = torch.tensor([-3.0, -7.0]); pr = torch.tensor([-4.0, -2.0])
    rc = torch.tensor([-3.5, -6.0]); rr = torch.tensor([-3.5, -3.0])
    beta, eps = 0.5, 0.2
    per_pair = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = (a - b) - (c - d)
        per_pair.append(-logsig(beta * z) * (1 - eps) - logsig(-beta * z) * eps)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(sum(per_pair) / 2, abs=1e-6)
    assert metrics["rewards/accuracy"] == 0.5  # second pair: chosen reward -0.5 < rejected reward 0.5


def test_ipo_loss_is_the_squared_distance_to_half_inverse_beta():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx((1.5 - 5.0) ** 2, abs=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge-ish")


def pair_batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 64, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]
    chosen = [torch.randint(5, 64, (n,), generator=g).tolist() for n in (3, 5, 4, 2)]
    rejected = [torch.randint(5, 64, (n,), generator=g).tolist() for n in (6, 2, 3, 4)]

    def side(answers):
        ids = [p + a for p, a in zip(prompts, answers)]
        labels = [[-100] * len(p) + a for p, a in zip(prompts, answers)]
        return pad_right(ids, 0), pad_right(labels, -100)

    ci, cl = side(chosen)
    ri, rl = side(rejected)
    return {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl}


def test_first_dpo_step_has_loss_ln2_when_policy_is_the_reference():
    policy = tiny_model()
    objective = DPOObjective.from_policy(policy, beta=0.1)
    loss, metrics = objective.loss(policy, pair_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-6)


def test_rpo_term_adds_the_mean_nll_per_chosen_token():
    policy = tiny_model()
    batch = pair_batch()
    plain, _ = DPOObjective.from_policy(policy, beta=0.1).loss(policy, batch)
    loss, metrics = DPOObjective.from_policy(policy, beta=0.1, rpo_alpha=0.5).loss(policy, batch)
    # By hand: every labelled chosen token's -log p, averaged over all chosen tokens of the batch.
    logits = policy(batch["chosen_input_ids"]).logits[:, :-1].float().log_softmax(-1)
    labels = batch["chosen_labels"][:, 1:]
    picked = [-logits[b, t, labels[b, t]].item() for b in range(labels.shape[0]) for t in range(labels.shape[1])
              if labels[b, t] != -100]
    nll = sum(picked) / len(picked)
    assert metrics["nll/chosen"] == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 0.5 * nll, rel=1e-5)
    with pytest.raises(ValueError, match="rpo_alpha"):
        DPOObjective(None, rpo_alpha=-1)


def test_dpo_training_raises_margin_and_cached_reference_gives_the_same_loss():
    policy = tiny_model()
    objective = DPOObjective.from_policy(policy, beta=0.5)
    batch = pair_batch()
    cached = precompute_reference(objective.reference, batch)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, metrics = objective.loss(policy, batch)
        cached_loss, _ = objective.loss(policy, cached)
        assert cached_loss.item() == pytest.approx(loss.item(), abs=1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert metrics["rewards/margin"] > 0 and metrics["rewards/accuracy"] == 1.0
    # The reference stays frozen.
    assert all(not p.requires_grad for p in objective.reference.parameters())


def test_bradley_terry_loss_and_accuracy_by_hand():
    loss, metrics = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == pytest.approx(-0.5)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    rm = RewardModel.from_causal_lm(tiny_model()).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]])
    with torch.no_grad():
        rewards = rm(ids, torch.tensor([3, 3]))
        alone = rm(torch.tensor([[5, 6, 7]]), torch.tensor([3]))
    torch.testing.assert_close(rewards, alone.expand(2), atol=1e-5, rtol=1e-5)


def test_reward_model_learns_to_rank_pairs():
    rm = RewardModel.from_causal_lm(tiny_model())
    batch = pair_batch()
    batch = {"chosen_input_ids": batch["chosen_input_ids"], "rejected_input_ids": batch["rejected_input_ids"],
             "chosen_lengths": (batch["chosen_labels"] != -100).sum(1) + torch.tensor([4, 6, 3, 5]),
             "rejected_lengths": (batch["rejected_labels"] != -100).sum(1) + torch.tensor([4, 6, 3, 5])}
    objective = RewardObjective()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for _ in range(15):
        loss, metrics = objective.loss(rm, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert metrics["accuracy"] == 1.0 and loss.item() < math.log(2)


def test_preference_pairs_from_a_checkpoint_drop_near_identical_answers():
    from sparrow.post_training.preference_data import build_pairs, similarity

    assert similarity("Paris", "Paris") == 1.0 and similarity("abcd", "wxyz") == 0.0
    torch.manual_seed(0)
    model = SparrowForCausalLM(SparrowConfig.from_preset("tiny", vocab_size=256, num_hidden_layers=1,
                                                         max_position_embeddings=64), backend="reference").eval()
    # The "weak checkpoint" always answers "77".
    model.lm_head.register_forward_hook(lambda m, i, o: o + torch.nn.functional.one_hot(torch.tensor(ord("7")), 256) * 100)
    pairs = build_pairs(model, ByteTokenizer(), [("q1", "77"), ("q2", "5"), ("q3", "778")], max_new_tokens=2,
                        max_similarity=0.8)
    # "77" vs "778": ratio 0.8, not above the threshold, so it stays.
    assert pairs == [{"prompt": "q2", "chosen": "5", "rejected": "77"}, {"prompt": "q3", "chosen": "778", "rejected": "77"}]
