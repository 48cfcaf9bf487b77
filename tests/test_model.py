import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.inference.kv_cache import KVCache
from lmforge.models.decoder import Decoder, DecoderConfig


def small_model(**changes) -> Decoder:
    torch.manual_seed(0)
    values = dict(vocab_size=97, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, context_length=32)
    values.update(changes)
    return Decoder(DecoderConfig(**values)).eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_cached_decoding_matches_full_forward(kv_heads):
    model = small_model(n_kv_heads=kv_heads)
    ids = torch.randint(0, 97, (3, 24))
    full = model(ids)
    cache = KVCache.for_model(model, batch_size=3)
    pieces = [model(ids[:, :9], cache), model(ids[:, 9:15], cache)]  # a prefill, then a multi-token chunk
    pieces += [model(ids[:, i : i + 1], cache) for i in range(15, 24)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_model_is_causal():
    model = small_model()
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    assert torch.allclose(model(ids)[:, :12], model(changed)[:, :12], atol=1e-6)
    assert not torch.allclose(model(ids)[:, 12:], model(changed)[:, 12:])


def test_tied_and_untied_parameter_counts():
    tied, untied = small_model(tie_embeddings=True), small_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 64
    assert tied.num_parameters(include_embeddings=False) == untied.num_parameters(include_embeddings=False)


def test_parameter_names_are_hugging_face_llama_names():
    names = set(small_model(tie_embeddings=False).state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"} <= names


def test_context_overflow_is_an_error():
    with pytest.raises(ValueError, match="context length"):
        small_model()(torch.zeros(1, 33, dtype=torch.long))


def test_recipe_defaults_derive_swiglu_width():
    config = DecoderConfig.from_recipe(ModelConfig(d_model=192, n_heads=4), vocab_size=1000)
    assert config.ffn_hidden == 512 and config.n_kv_heads == 4


def test_loss_ignores_masked_targets():
    model = small_model()
    ids = torch.randint(0, 97, (2, 10))
    targets = ids.roll(-1, dims=1)
    masked = targets.clone()
    masked[:, 5:] = -100
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, 97), targets[:, :5].reshape(-1))
    assert torch.allclose(model.loss(ids, masked), expected, atol=1e-6)


def test_chunked_loss_equals_the_whole_loss_and_its_gradients():
    torch.manual_seed(0)
    model = small_model().train()
    ids = torch.randint(0, 97, (3, 11))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, :4] = -100  # ignored targets must stay ignored across chunk borders
    whole = model(inputs, targets=targets)
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.loss_chunk_tokens = 7  # 30 tokens: chunks of 7, 7, 7, 7, 2
    chunked = model(inputs, targets=targets)
    chunked.backward()
    assert torch.allclose(chunked, whole, atol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-6), name
