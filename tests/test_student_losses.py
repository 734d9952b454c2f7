"""DistillationLoss against values computed by hand (plain Python math, not torch's functions)."""
from __future__ import annotations

import math

import pytest
import torch

from student.errors import StudentError
from student.losses import DistillationLoss, teacher_log_probs
from teacher_cache.targets import TAIL_TAUS, TeacherTargets, encode_teacher_logits, soft_tail_mass

# Two samples, four classes.
CLS = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, -0.4]]
DIST = [[1.0, -0.5, 0.25, 0.0], [-1.0, 2.0, 0.5, 0.5]]
TARGETS = [[0.85, 0.05, 0.05, 0.05], [0.3, 0.6, 0.05, 0.05]]      # mixed, smoothed true labels
TEACHER_LOGITS = [[0.5, 3.0, -1.0, 0.0], [1.5, 0.0, 0.25, -2.0]]


def log_softmax(row, tau=1.0):
    z = [v / tau for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def hand_base():
    return sum(-sum(t * l for t, l in zip(trow, log_softmax(crow))) for trow, crow in zip(TARGETS, CLS)) / len(CLS)


def hand_hard(labels):
    return sum(-log_softmax(row)[y] for row, y in zip(DIST, labels)) / len(DIST)


def hand_soft(teacher_logp_rows, tau):
    """DeiT: KL(sum over all elements) * tau^2 / numel, KL(t||s) = sum p_t (log p_t - log p_s)."""
    total = 0.0
    for drow, trow in zip(DIST, teacher_logp_rows):
        s = log_softmax(drow, tau)
        total += sum(math.exp(t) * (t - si) for t, si in zip(trow, s))
    return total * tau * tau / (len(DIST) * len(DIST[0]))


def full_targets() -> TeacherTargets:
    return encode_teacher_logits(torch.tensor(TEACHER_LOGITS), topk=2, store_full=True)


def test_none_is_soft_target_cross_entropy_on_the_class_head():
    loss = DistillationLoss("none")((torch.tensor(CLS), torch.tensor(DIST)), torch.tensor(TARGETS))
    assert loss.total.item() == pytest.approx(hand_base(), rel=1e-6)
    assert loss.distill.item() == 0.0


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_hard_uses_teacher_argmax_without_smoothing(alpha):
    teacher = full_targets()
    labels = [max(range(4), key=lambda c: row[c]) for row in TEACHER_LOGITS]          # [1, 0]
    assert teacher.label.tolist() == labels
    loss = DistillationLoss("hard", alpha=alpha)((torch.tensor(CLS), torch.tensor(DIST)), torch.tensor(TARGETS), teacher)
    assert loss.base.item() == pytest.approx(hand_base(), rel=1e-6)
    assert loss.distill.item() == pytest.approx(hand_hard(labels), rel=1e-6)
    assert loss.total.item() == pytest.approx((1 - alpha) * hand_base() + alpha * hand_hard(labels), rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_from_full_logits_is_deit_kl(tau):
    teacher = full_targets()
    stored = teacher.logits.tolist()             # fp16-rounded logits, as the cache keeps them
    expected = hand_soft([log_softmax(row, tau) for row in stored], tau)
    loss = DistillationLoss("soft", alpha=0.5, tau=tau)((torch.tensor(CLS), torch.tensor(DIST)), torch.tensor(TARGETS), teacher)
    assert loss.distill.item() == pytest.approx(expected, rel=1e-5)
    assert loss.total.item() == pytest.approx(0.5 * hand_base() + 0.5 * expected, rel=1e-5)


def rebuilt_from_topk(indices, logprobs, num_classes):
    """Top-k log-probs kept, the rest of the mass spread evenly over the other classes."""
    rows = []
    for idx, lp in zip(indices, logprobs):
        rest = (1.0 - sum(math.exp(v) for v in lp)) / (num_classes - len(idx))
        row = [math.log(rest)] * num_classes
        for i, v in zip(idx, lp):
            row[i] = v
        rows.append(row)
    return rows


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_from_topk_without_tail_summary_spreads_the_remaining_mass_uniformly(tau):
    """Caches made before the tail summary: the rest of the mass spread evenly at τ = 1, then tempered."""
    encoded = encode_teacher_logits(torch.tensor(TEACHER_LOGITS), topk=2, store_full=False)
    assert encoded.logits is None and encoded.tail_logsumexp is not None
    teacher = TeacherTargets(encoded.topk_indices, encoded.topk_logprobs)
    p = rebuilt_from_topk(teacher.topk_indices.tolist(), teacher.topk_logprobs.tolist(), 4)
    # tempering the rebuilt distribution: softmax(log p / tau)
    expected_rows = [log_softmax(row, tau) for row in p]
    got = teacher_log_probs(teacher, 4, tau)
    assert torch.allclose(got, torch.tensor(expected_rows), atol=1e-6)
    assert torch.allclose(got.exp().sum(dim=1), torch.ones(2), atol=1e-6)
    loss = DistillationLoss("soft", alpha=0.5, tau=tau)((torch.tensor(CLS), torch.tensor(DIST)), torch.tensor(TARGETS), teacher)
    assert loss.distill.item() == pytest.approx(hand_soft(expected_rows, tau), rel=1e-5)


def test_tail_summary_is_the_tails_log_sum_exp_at_the_stored_taus():
    teacher = encode_teacher_logits(torch.tensor(TEACHER_LOGITS), topk=2)
    for row, idx, lse in zip(TEACHER_LOGITS, teacher.topk_indices.tolist(), teacher.tail_logsumexp.tolist()):
        tail = [v for c, v in enumerate(log_softmax(row)) if c not in idx]
        for tau, got in zip(TAIL_TAUS, lse):
            assert got == pytest.approx(math.log(sum(math.exp(v / tau) for v in tail)), abs=4e-3)  # fp16


def synthetic_logits(n: int = 256, classes: int = 1000, gen_temperature: float = 1.0, seed: int = 0):
    """ImageNet-like teacher logits: a peaked top class, 30 related classes, a heavy-tailed rest."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, classes, generator=g) / ((torch.randn(n, classes, 3, generator=g) ** 2).mean(-1)).sqrt()
    related = torch.rand(n, classes, generator=g).argsort(dim=1)[:, :30]
    z.scatter_(1, related, z.max(dim=1, keepdim=True).values - 1 - 2 * torch.rand(n, 30, generator=g))
    top = torch.randint(0, classes, (n, 1), generator=g)
    z.scatter_(1, top, z.max(dim=1, keepdim=True).values + 2 + torch.empty(n, 1).exponential_(1 / 3, generator=g))
    return z / gen_temperature


def total_variation(log_p, log_q):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=1)


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0, 4.0, 6.0])
def test_soft_targets_from_topk_against_a_full_logit_cache(tau):
    """Synthetic 1,000-class logits: full logits rebuild the exact target; top-k + tail summary gets
    the tail mass right (stored at τ = 1..4; interpolated at 6, never too small), so its total
    variation stays under the reported bound, and far under the old even spread's at τ > 1."""
    z = synthetic_logits()
    exact = torch.log_softmax(z / tau, dim=1)
    full = teacher_log_probs(encode_teacher_logits(z, 10, store_full=True), 1000, tau)
    delta = float((z.half().float() - z).abs().max()) / tau      # fp16 rounding of the stored logits
    assert total_variation(exact, full).max() <= math.expm1(2 * delta) / 2 + 1e-6
    teacher = encode_teacher_logits(z, 10)
    rebuilt = teacher_log_probs(teacher, 1000, tau)
    mask = torch.ones_like(z, dtype=torch.bool).scatter(1, teacher.topk_indices, False)
    exact_tail = (exact.exp() * mask).sum(dim=1)
    bound = soft_tail_mass(teacher, 1000, tau)
    if tau in TAIL_TAUS:
        assert torch.allclose(bound, exact_tail, rtol=0.01, atol=1e-4)
    else:
        assert (bound >= exact_tail - 1e-4).all()
    assert torch.allclose((rebuilt.exp() * mask).sum(dim=1), bound, atol=1e-5)
    tv = total_variation(exact, rebuilt)
    assert (tv <= bound + 2e-3).all()
    legacy = teacher_log_probs(TeacherTargets(teacher.topk_indices, teacher.topk_logprobs), 1000, tau)
    if tau > 1:      # stored τ: much better than the even spread; interpolated τ: still better
        assert tv.mean() < (0.7 if tau in TAIL_TAUS else 1.0) * total_variation(exact, legacy).mean()


def test_tail_mass_is_zero_when_nothing_is_left_out_and_unknown_for_old_caches():
    z = synthetic_logits(n=4, classes=20)
    assert soft_tail_mass(encode_teacher_logits(z, 20), 20, 3.0).abs().max() == 0
    assert soft_tail_mass(encode_teacher_logits(z, 5, store_full=True), 20, 3.0).abs().max() == 0
    old = encode_teacher_logits(z, 5)
    old = TeacherTargets(old.topk_indices, old.topk_logprobs)
    assert soft_tail_mass(old, 20, 3.0) is None
    assert soft_tail_mass(old, 20, 1.0) is not None


def test_topk_of_all_classes_equals_full_distribution():
    logits = torch.tensor(TEACHER_LOGITS)
    top_all = teacher_log_probs(encode_teacher_logits(logits, topk=4), 4)
    assert torch.allclose(top_all, torch.log_softmax(logits, dim=1), atol=2e-3)   # fp16 rounding of the values


def test_one_head_model_distils_through_its_only_head():
    teacher = full_targets()
    labels = teacher.label.tolist()
    logits = torch.tensor(DIST)
    loss = DistillationLoss("hard", alpha=0.5)(logits, torch.tensor(TARGETS), teacher)
    base = sum(-sum(t * l for t, l in zip(trow, log_softmax(drow))) for trow, drow in zip(TARGETS, DIST)) / 2
    assert loss.total.item() == pytest.approx(0.5 * base + 0.5 * hand_hard(labels), rel=1e-6)


def test_gradients_flow_to_both_heads():
    cls, dist = torch.tensor(CLS, requires_grad=True), torch.tensor(DIST, requires_grad=True)
    DistillationLoss("soft")((cls, dist), torch.tensor(TARGETS), full_targets()).total.backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0


def test_bad_arguments_are_refused():
    with pytest.raises(StudentError, match="distillation type"):
        DistillationLoss("medium")
    with pytest.raises(StudentError, match="alpha"):
        DistillationLoss("soft", alpha=1.5)
    with pytest.raises(StudentError, match="needs teacher targets"):
        DistillationLoss("hard")((torch.tensor(CLS), torch.tensor(DIST)), torch.tensor(TARGETS), None)
