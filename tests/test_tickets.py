"""Tickets from scores: exactly which heads go, counts, kinds, nestedness, parameter counts, files."""

from __future__ import annotations

import json

import pytest
import torch

from st.errors import UserError
from st.importance import Scores, fingerprint
from st.models.bert import Bert, BertConfig
from st.models.heads import BertClassifier
from st.tickets import Pruner, Ticket, make_ticket, percent_remaining, pruned_config, round_half_up

L, H0, D, F0, V = 3, 4, 16, 32, 50
CONFIG = BertConfig(vocab_size=V, hidden_size=D, num_layers=L, num_heads=H0, intermediate_size=F0)
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]

# Rows already of unit L2 norm, each scaled by a different factor: normalisation undoes the scale, so
# the ranking below is the one of these unit rows, not of the raw values (layer 2 would win raw).
UNIT_ROWS = [[0.5, 0.5, 0.5, 0.5], [0.1, 0.7, 0.7, 0.1], [0.2, 0.4, 0.4, 0.8]]
SCALES = [2.0, 0.3, 5.0]
SCORES = Scores([[x * s for x in r] for r, s in zip(UNIT_ROWS, SCALES)], [0.3, 0.1, 0.2], 10, fingerprint(CONFIG))
# Ascending normalised scores, ties by (layer, head):
# (1,0) .1, (1,3) .1, (2,0) .2, (2,1) .4, (2,2) .4, (0,0..3) .5, (1,1) .7, (1,2) .7, (2,3) .8


def pruned_heads(t: Ticket) -> set[tuple[int, int]]:
    return {(l, h) for l, row in enumerate(t.head_mask) for h, m in enumerate(row) if m == 0}


def pruned_ffn(t: Ticket) -> set[int]:
    return {l for l, m in enumerate(t.ffn_mask) if m == 0}


def test_normalised_rows_have_unit_norm():
    for row, unit in zip(SCORES.head, UNIT_ROWS):
        assert row == pytest.approx(unit)
        assert sum(x * x for x in row) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "ratio, heads, ffn",
    [
        (0.0, set(), set()),
        (0.1, {(1, 0)}, set()),  # round(1.2) = 1 head, round(0.3) = 0 FFN
        (0.2, {(1, 0), (1, 3)}, {1}),  # 2.4 -> 2 heads, 0.6 -> 1 FFN (the lowest, layer 1)
        (0.3, {(1, 0), (1, 3), (2, 0), (2, 1)}, {1}),  # 3.6 -> 4
        (0.4, {(1, 0), (1, 3), (2, 0), (2, 1), (2, 2)}, {1}),  # 4.8 -> 5; layer 2 keeps only head 3
        (0.6, {(1, 0), (1, 3), (2, 0), (2, 1), (2, 2), (0, 0), (0, 1)}, {1, 2}),  # 7.2 -> 7; 1.8 -> 2 FFN
        # 9.6 -> 10 asked, 9 possible; (0,3) would empty layer 0, so the walk skips it and takes (1,1); 2.4 -> 2 FFN
        (0.8, {(1, 0), (1, 3), (2, 0), (2, 1), (2, 2), (0, 0), (0, 1), (0, 2), (1, 1)}, {1, 2}),
    ],
)
def test_winning_prunes_lowest_normalised_scores_globally(ratio, heads, ffn):
    t = make_ticket(SCORES, ratio)
    assert pruned_heads(t) == heads
    assert pruned_ffn(t) == ffn
    assert (t.heads_pruned, t.ffn_pruned) == (len(heads), len(ffn))
    assert t.kind == "winning" and t.ratio == ratio


def test_losing_prunes_highest_scores():
    # Descending: (2,3) .8, (1,1) .7, (1,2) .7, (0,0..3) .5, (2,1) .4, (2,2) .4, (2,0) .2, (1,0) .1, (1,3) .1
    assert pruned_heads(make_ticket(SCORES, 0.2, "losing")) == {(2, 3), (1, 1)}
    assert pruned_ffn(make_ticket(SCORES, 0.2, "losing")) == {0}
    # 9 heads: (0,3) is layer 0's last -> skipped; (2,0) is layer 2's last -> skipped; (1,0) taken
    t = make_ticket(SCORES, 0.8, "losing")
    assert pruned_heads(t) == {(2, 3), (1, 1), (1, 2), (0, 0), (0, 1), (0, 2), (2, 1), (2, 2), (1, 0)}
    assert t.head_mask == ((0, 0, 0, 1), (0, 0, 0, 1), (1, 0, 0, 0))


def test_round_half_up_not_bankers():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 4.5, 4.49)] == [1, 2, 3, 5, 4]
    assert make_ticket(SCORES, 0.375).heads_pruned == 5  # 4.5 heads -> 5 (round() would give 4)
    assert make_ticket(SCORES, 0.5).ffn_pruned == 2  # 1.5 FFN blocks -> 2


@pytest.mark.parametrize("kind", ["winning", "losing", "random"])
def test_counts_constraint_and_nestedness(kind):
    tickets = Pruner(SCORES).tickets(RATIOS, kind, seed=3)
    for r, t in zip(RATIOS, tickets):
        assert t.heads_pruned == min(round_half_up(r * L * H0), L * (H0 - 1))
        assert t.ffn_pruned == round_half_up(r * L)
        assert all(any(row) for row in t.head_mask)
    for small, big in zip(tickets, tickets[1:]):
        assert pruned_heads(small) <= pruned_heads(big)
        assert pruned_ffn(small) <= pruned_ffn(big)


def test_nestedness_and_constraint_on_a_larger_random_score_table():
    g = torch.Generator().manual_seed(0)
    scores = Scores(torch.rand(12, 12, generator=g), torch.rand(12, generator=g), 1)
    for kind in ("winning", "losing", "random"):
        tickets = Pruner(scores).tickets(RATIOS, kind, seed=1)
        for small, big in zip(tickets, tickets[1:]):
            assert pruned_heads(small) <= pruned_heads(big) and pruned_ffn(small) <= pruned_ffn(big)
        assert [t.heads_pruned for t in tickets] == [round_half_up(r * 144) for r in RATIOS]


def test_random_is_seeded():
    a, b, c = (make_ticket(SCORES, 0.5, "random", seed=s) for s in (7, 7, 8))
    assert a == b
    assert a.head_mask != c.head_mask
    assert a.seed == 7 and a.kind == "random"
    # not the winning ticket in disguise, for at least one of a few seeds
    assert any(
        make_ticket(SCORES, 0.5, "random", seed=s).head_mask != make_ticket(SCORES, 0.5).head_mask for s in range(5)
    )


def test_ties_broken_by_layer_then_head():
    flat = Scores([[1.0] * H0] * L, [1.0] * L, 1)
    t = make_ticket(flat, 0.4)  # 4.8 -> 5 heads, 1.2 -> 1 FFN
    assert pruned_heads(t) == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    assert pruned_ffn(t) == {0}


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_out_of_range(ratio):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        make_ticket(SCORES, ratio)


def test_unknown_kind():
    with pytest.raises(UserError, match="winning"):
        make_ticket(SCORES, 0.1, "best")


# ---- parameter counts -------------------------------------------------------------------------


def test_percent_remaining_matches_hand_count():
    C, P, Dh = 3, CONFIG.max_position_embeddings, D // H0
    embeddings = V * D + P * D + 2 * D + 2 * D
    layer = (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * F0 + F0) + (F0 * D + D) + 2 * D
    encoder = embeddings + L * layer
    model = encoder + (D * D + D) + (D * C + C)
    per_head = 3 * (Dh * D + Dh) + Dh * D  # Q, K, V rows and biases, output-projection columns
    per_ffn = 2 * D * F0 + F0 + D  # both linear layers with their biases
    t = make_ticket(SCORES, 0.6, config=CONFIG, num_labels=C)  # 7 heads, 2 FFN blocks
    removed = 7 * per_head + 2 * per_ffn
    assert t.percent_remaining == {
        "model": 100.0 * (model - removed) / model,
        "encoder": 100.0 * (encoder - removed) / encoder,
    }
    assert percent_remaining(CONFIG, Ticket.full(CONFIG), C) == {"model": 100.0, "encoder": 100.0}
    assert make_ticket(SCORES, 0.6).percent_remaining is None  # no config, no count


def test_pruned_config_builds_the_pruned_model():
    t = make_ticket(SCORES, 0.4)
    c = pruned_config(CONFIG, t)
    assert c.kept_heads == ((0, 1, 2, 3), (1, 2), (3,))
    assert c.ffn_sizes == (F0, 0, F0)
    model = Bert(c)
    assert model.layers[1].ffn is None and model.layers[2].attention.n_heads == 1
    with pytest.raises(UserError, match="already pruned"):
        pruned_config(c, t)


# ---- files and validation ---------------------------------------------------------------------


def test_ticket_round_trip(tmp_path):
    t = make_ticket(SCORES, 0.3, "random", seed=5, config=CONFIG)
    path = tmp_path / "ticket.json"
    t.save(path)
    back = Ticket.load(path)
    assert back == t and back.source == str(path)
    d = json.loads(path.read_text())
    assert d["heads_pruned"] == 4 and d["ffn_pruned"] == 1 and d["model_fingerprint"] == fingerprint(CONFIG)
    assert torch.equal(back.head_mask_tensor(), torch.tensor(t.head_mask, dtype=torch.float32))
    assert back.ffn_mask_tensor().dtype == torch.float32 and back.ffn_mask_tensor().shape == (L,)
    full = Ticket.full(CONFIG)
    assert full.heads_pruned == 0 and full.ratio == 0.0 and full.kind == "full"


def test_ticket_shape_mismatch(tmp_path):
    path = tmp_path / "t.json"
    make_ticket(SCORES, 0.3).save(path)
    t = Ticket.load(path)
    t.check_matches(CONFIG)
    other = BertConfig(vocab_size=V, hidden_size=D, num_layers=2, num_heads=2, intermediate_size=F0)
    with pytest.raises(UserError, match=r"t\.json has shape 3×4 for a model with 2×2"):
        t.check_matches(other)
    wider = BertConfig(vocab_size=V, hidden_size=32, num_layers=L, num_heads=H0, intermediate_size=F0)
    with pytest.raises(UserError, match="hidden_size 16 vs 32"):
        t.check_matches(wider)
    with pytest.raises(UserError, match="hidden_size"):
        make_ticket(SCORES, 0.3, config=wider)


GOOD = make_ticket(SCORES, 0.3).to_json()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "not a valid ticket"),
        ("[1, 2]", "JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "head_mask"}), "missing keys"),
        (json.dumps({**GOOD, "head_mask": [[1, 1, 1, 2]] * 3}), "0 or 1"),
        (json.dumps({**GOOD, "head_mask": [[1, 1, 1, True]] * 3}), "0 or 1"),
        (json.dumps({**GOOD, "head_mask": [[1, 1, 1, 0.5]] * 3}), "0 or 1"),
        (json.dumps({**GOOD, "head_mask": "1111"}), "head_mask"),
        (json.dumps({**GOOD, "head_mask": [[1, 1, 1, 1], [1, 1], [1, 1, 1, 1]]}), "same"),
        (json.dumps({**GOOD, "ffn_mask": [1, 1]}), "ffn_mask has 2"),
        (json.dumps({**GOOD, "head_mask": [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 1]]}), r"layer\(s\) \[1\]"),
        (json.dumps({**GOOD, "ratio": 1.0}), "ratio"),
        (json.dumps({**GOOD, "kind": "best"}), "kind"),
    ],
)
def test_malformed_ticket_file(tmp_path, content, message):
    path = tmp_path / "bad_ticket.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        Ticket.load(path)
    assert "bad_ticket.json" in str(e.value)


def test_missing_ticket_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Ticket.load(tmp_path / "nope.json")


def test_classifier_on_meta_device_leaves_no_real_tensors():
    # percent_remaining builds models on the meta device: the count costs no memory even for BERT-large
    with torch.device("meta"):
        m = BertClassifier(Bert(CONFIG), 2)
    assert all(p.is_meta for p in m.parameters())
