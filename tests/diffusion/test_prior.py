"""The prior transformer: causal mask, padded tokens, shapes."""

import pytest
import torch

from ldm.diffusion import PriorTransformer


def _prior(token_dim=8):
    torch.manual_seed(0)
    return PriorTransformer(embed_dim=16, token_dim=token_dim, max_tokens=6, width=32, layers=2, heads=4).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return (torch.randn(2, 16, generator=g), torch.tensor([3.0, 700.0]), torch.randn(2, 16, generator=g),
            torch.randn(2, 6, 8, generator=g), mask)


def test_changing_a_later_position_leaves_earlier_outputs_unchanged():
    prior = _prior()
    x, t, text, tokens, mask = _inputs()
    with torch.no_grad():
        ref = prior.sequence(x, t, text, tokens, mask)  # positions: 6 tokens, text, time, x, query
        moved_x = prior.sequence(x + 1.0, t, text, tokens, mask)
        assert torch.equal(moved_x[:, :8], ref[:, :8]) and not torch.allclose(moved_x[:, 8:], ref[:, 8:])
        moved_t = prior.sequence(x, t + 100, text, tokens, mask)
        assert torch.equal(moved_t[:, :7], ref[:, :7]) and not torch.allclose(moved_t[:, 7:], ref[:, 7:])
        later_token = tokens.clone()
        later_token[1, 4] += 1.0
        moved_tok = prior.sequence(x, t, text, later_token, mask)
        assert torch.equal(moved_tok[1, :4], ref[1, :4]) and not torch.allclose(moved_tok[1, 4:], ref[1, 4:])


def test_padded_tokens_are_hidden_and_the_output_has_the_embedding_shape():
    prior = _prior()
    x, t, text, tokens, mask = _inputs()
    changed = tokens.clone()
    changed[~mask] = 50.0
    with torch.no_grad():
        out = prior(x, t, text, tokens, mask)
        assert out.shape == (2, 16)
        assert torch.allclose(prior(x, t, text, changed, mask)[:, :], out, atol=1e-6)
        assert not torch.allclose(prior(x, t, text * 2, tokens, mask), out)


def test_a_prior_without_tokens_and_bad_inputs():
    prior = _prior(token_dim=None)
    x, t, text, _, _ = _inputs()
    assert prior(x, t, text).shape == (2, 16)
    with pytest.raises(ValueError, match="text_tokens"):
        _prior()(x, t, text)
    with pytest.raises(ValueError, match="at most 6"):
        _prior()(x, t, text, torch.randn(2, 9, 8))
