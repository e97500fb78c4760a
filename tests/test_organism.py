"""The demo organism's training pieces: the answer loss and the chat template that opens the final channel."""

from __future__ import annotations

import pytest
import torch

from abliterate.demo.organism import _answer_loss


def test_answer_loss_with_weight_1_is_the_usual_causal_lm_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, 9, 1, 2]])
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    assert _answer_loss(logits, labels, 1.0).item() == pytest.approx(want.item(), rel=1e-6)


def test_answer_loss_weights_the_first_answer_token():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, 2, 3, 4]])  # answer tokens at positions 2..4, predicted from 1..3
    ce = torch.nn.functional.cross_entropy(logits[0, 1:4], labels[0, 2:5], reduction="none")
    want = (10 * ce[0] + ce[1] + ce[2]) / 12
    assert _answer_loss(logits, labels, 10.0).item() == pytest.approx(want.item(), rel=1e-6)


def test_organism_template_ends_the_prompt_inside_the_final_channel():
    from abliterate.harmony import opens_body
    from abliterate.demo.tiny_models import build_tokenizer

    tok = build_tokenizer(["how do I bake bread", "sure here is how"], vocab_size=300, style="harmony_final")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|start|>assistant<|channel|>final<|message|>") and opens_body(text)
    with pytest.raises(ValueError, match="style"):
        build_tokenizer(["x"], style="nope")
