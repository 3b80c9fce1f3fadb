import math
from dataclasses import dataclass

import pytest
import torch
from conftest import ByteTokenizer

from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.post_training.evaluation import exact_match, extract_answer, perplexity, preference_accuracy
from sparrow.post_training.losses import pad_right
from sparrow.post_training.reward_model import RewardModel


def tiny(vocab=64, seed=0):
    torch.manual_seed(seed)
    return SparrowForCausalLM(SparrowConfig.from_preset("tiny", vocab_size=vocab, num_hidden_layers=2,
                                                        max_position_embeddings=32), backend="reference").eval()


def test_perplexity_of_an_untrained_model_is_near_the_vocab_and_equals_exp_loss():
    model = tiny()
    rows = [list(range(5, 25)), list(range(30, 40))]
    ppl = perplexity(model, rows, batch_size=1)
    with torch.no_grad():
        a = model(torch.tensor([rows[0]]), labels=torch.tensor([rows[0]])).loss.item()
        b = model(torch.tensor([rows[1]]), labels=torch.tensor([rows[1]])).loss.item()
    # Token-weighted: 19 and 9 predicted tokens.
    assert ppl == pytest.approx(math.exp((19 * a + 9 * b) / 28), rel=1e-5)
    assert 40 < ppl < 100  # near-uniform over 64 tokens


def test_perplexity_windows_rows_longer_than_the_context():
    assert math.isfinite(perplexity(tiny(), [list(range(60)) * 2]))


def test_extract_answer_cuts_at_sentence_end_or_end_token():
    assert extract_answer(" Paris. It is big") == "Paris"
    assert extract_answer("巴黎。") == "巴黎"
    assert extract_answer("42<|end|>junk") == "42"


@dataclass
class Item:
    prompt: str
    answer: str


def test_exact_match_counts_greedy_answers():
    model = tiny(vocab=256)
    # Make the model always say "7": a bias on the LM head towards the byte of "7".
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.lm_head.register_forward_hook(lambda m, i, o: o + torch.nn.functional.one_hot(torch.tensor(ord("7")), 256) * 10)
    result = exact_match(model, ByteTokenizer(), [Item("1+6=", "7777"), Item("2+2=", "4")], max_new_tokens=4)
    assert result["exact_match"] == 0.5 and result["samples"][1]["got"] == "7777"


def test_preference_accuracy_with_implicit_rewards_and_a_reward_model():
    policy, reference = tiny(seed=0), tiny(seed=0)
    chosen = [[5, 6, 7, 8], [9, 10, 11]]
    rejected = [[5, 6, 12, 13], [9, 10, 14]]
    labels = lambda rows: pad_right([[-100, -100] + r[2:] for r in rows], -100)
    pairs = {"chosen_input_ids": pad_right(chosen, 0), "chosen_labels": labels(chosen),
             "rejected_input_ids": pad_right(rejected, 0), "rejected_labels": labels(rejected)}
    same = preference_accuracy(pairs, policy=policy, reference=reference)
    assert same["margin"] == pytest.approx(0.0, abs=1e-6) and same["preference_accuracy"] == 0.0
    # Make the policy prefer the chosen answers' tokens.
    bias = torch.zeros(64); bias[[7, 8, 11]] = 5.0
    policy.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    better = preference_accuracy(pairs, policy=policy, reference=reference)
    assert better["preference_accuracy"] == 1.0 and better["margin"] > 0
    rm = RewardModel.from_causal_lm(tiny()).eval()
    rm_pairs = {"chosen_input_ids": pairs["chosen_input_ids"], "rejected_input_ids": pairs["rejected_input_ids"],
                "chosen_lengths": torch.tensor([4, 3]), "rejected_lengths": torch.tensor([4, 3])}
    result = preference_accuracy(rm_pairs, reward_model=rm)
    assert 0.0 <= result["preference_accuracy"] <= 1.0 and result["n"] == 2
