"""The checks that matter, on the device `pytest --device` names: cpu in CI, cuda from docs/gpu/check.sh.
Encoder parity and invariants, importance, pruning, fine-tune resume, ticket-sharing exactness,
precision, and (CUDA only) varlen attention over packed tokens against the padded path."""

from __future__ import annotations

import pytest
import torch

import st.models.bert as bert
from st.importance import compute_importance
from st.models import load_pretrained
from st.models.bert import Bert
from st.pipeline import run_finetune
from st.precision import compute_copy
from st.prune import prune_encoder
from st.specs import TrainConfig
from st.train import Group, TrainingStep
from tests.conftest import Interrupt, stop_at_epoch
from tests.test_bert import H0, L, random_batch, tiny_model
from tests.test_importance import make_batches, reference_scores
from tests.test_importance import tiny_model as tiny_classifier
from tests.test_share import A, batch, make_sharer, outside
from tests.test_train import make_job

pytestmark = pytest.mark.usefixtures("one_thread")


def padded(B: int = 4, T: int = 11, seed: int = 1):
    ids, types = random_batch(B, T, seed)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 2 * b :] = 0
    return ids * mask, types * mask, mask


def to(device, *tensors):
    return [t.to(device) for t in tensors]


def test_encoder_parity_with_transformers(tiny_bert_dir, device):
    from transformers import BertModel

    ours, hf = (
        load_pretrained(tiny_bert_dir).to(device).eval(),
        BertModel.from_pretrained(tiny_bert_dir).to(device).eval(),
    )
    ids, types, mask = to(device, *padded(seed=2))
    ids = ids % ours.config.vocab_size
    with torch.no_grad():
        expected = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours(ids, types, mask)[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)


def test_padding_and_all_ones_masks_change_nothing(device):
    model = tiny_model().to(device)
    ids, types, mask = to(device, *padded())
    with torch.no_grad():
        out = model(ids, types, mask)
        ones = model(
            ids, types, mask, head_mask=torch.ones(L, H0, device=device), ffn_mask=torch.ones(L, device=device)
        )
        torch.testing.assert_close(ones, out)
        for b in range(ids.shape[0]):  # each example alone, unpadded, gives its real tokens' outputs
            n = int(mask[b].sum())
            alone = model(ids[b : b + 1, :n], types[b : b + 1, :n])
            torch.testing.assert_close(alone[0], out[b, :n], rtol=1e-5, atol=1e-5)


def test_zeroed_heads_and_ffn_equal_removed_ones(device):
    model = tiny_model().to(device)
    head_mask = torch.ones(L, H0)
    head_mask[0, 1] = head_mask[2, 0] = head_mask[2, 3] = 0
    ffn_mask = torch.tensor([1.0, 0.0, 1.0])
    pruned = prune_encoder(model, head_mask, ffn_mask).to(device)
    ids, types, mask = to(device, *padded())
    with torch.no_grad():
        masked = model(ids, types, mask, head_mask=head_mask.to(device), ffn_mask=ffn_mask.to(device))
        torch.testing.assert_close(pruned(ids, types, mask), masked, rtol=1e-5, atol=1e-5)


def test_importance_on_the_device_equals_the_reference(device):
    model, batches = tiny_classifier(), make_batches()
    head_ref, ffn_ref = reference_scores(model, batches)
    scores = compute_importance(model, batches, device=device)
    torch.testing.assert_close(torch.tensor(scores.head_raw).double(), head_ref.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(scores.ffn_raw).double(), ffn_ref.double(), rtol=1e-4, atol=1e-7)


def test_bf16_computes_in_bf16_and_scores_like_fp32(device):
    model, batches = tiny_classifier(), make_batches()
    fp32 = compute_importance(model, batches, device=device)
    bf16 = compute_importance(model, batches, device=device, precision="bf16")
    assert bf16.precision == "bf16"
    a, b = torch.tensor(fp32.head_raw), torch.tensor(bf16.head_raw)
    assert torch.allclose(a, b, rtol=0.1, atol=0.01 * a.max().item())
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    step = TrainingStep(model.to(device).train(), optimizer, TrainConfig(precision="bf16"), device)
    assert next(step.compute.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    loss = step(Group([batches[0]], "a step"))
    assert loss == loss and all(torch.isfinite(p).all() for p in model.parameters())


def test_finetune_resumes_to_the_same_result(tiny_bert_dir, sentiment_dir, tmp_path, device):
    job = make_job(tiny_bert_dir, sentiment_dir, epochs=2)
    straight = run_finetune(job, tmp_path / "straight", device=str(device))

    crash = stop_at_epoch(1)

    with pytest.raises(Interrupt):
        run_finetune(job, tmp_path / "resumed", device=str(device), on_epoch=crash)
    resumed = run_finetune(job, tmp_path / "resumed", device=str(device))
    assert [e["dev"] for e in resumed["epochs"]] == [e["dev"] for e in straight["epochs"]]


def test_a_ticket_sharing_step_changes_exactly_its_ticket(device):
    sharer = make_sharer()
    sharer.model.to(device)
    optimizer = torch.optim.Adamax(sharer.model.parameters(), lr=1e-2, weight_decay=0.01)
    for i, name in enumerate("bab"):  # momentum everywhere first
        sharer.step(name, batch(i, {"a": 2, "b": 3}[name]), optimizer, TrainConfig())
    before = {n: p.detach().clone() for n, p in sharer.model.named_parameters()}
    sharer.step("a", batch(10, 2), optimizer, TrainConfig())
    masks = outside(sharer.model, A, 0)
    for name, p in sharer.model.named_parameters():
        assert torch.equal(p.detach()[masks[name].to(device)], before[name][masks[name].to(device)]), name


def test_varlen_attention_equals_the_padded_path(device, monkeypatch):
    if device.type != "cuda":
        pytest.skip("varlen flash attention runs on CUDA only; elsewhere the padded path is the only one")
    torch.manual_seed(0)
    model = compute_copy(Bert(tiny_model().config).to(device).eval(), "bf16")
    ids, types, mask = to(device, *padded(B=6, T=40))
    head_mask = torch.rand(6, L, H0, device=device)
    with torch.no_grad():
        varlen = model(ids, types, mask, head_mask=head_mask)
        monkeypatch.setattr(bert, "VARLEN", False)
        padded_path = model(ids, types, mask, head_mask=head_mask)
    torch.testing.assert_close(varlen.float(), padded_path.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding
