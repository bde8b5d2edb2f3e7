"""Our tokenizer adapter drives megatron-core's own GPTDataset / BlendedMegatronDatasetBuilder (no loader of ours)."""

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from evolm_nemo.data.tokenizer import MegatronHFTokenizer, load_tokenizer

SEQ = 24


def build(prefix, mtok, cache, eod_mask_loss=False, samples=40):
    config = GPTDatasetConfig(
        random_seed=5, sequence_length=SEQ, blend=([prefix], None), split="100,0,0", tokenizer=mtok,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask_loss, path_to_cache=str(cache),
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, [samples, None, None], lambda: True, config).build()


def test_adapter_exposes_what_megatron_needs(tok, synth):
    m = MegatronHFTokenizer(tok)
    assert m.vocab_size == len(tok) and m.eod == m.eos == m.eos_id == tok.eos_token_id == 2
    assert m.bos == 1 and m.pad == 3 and m.pad != m.eod
    text = "Ann has 5 pens. The answer is \\boxed{5}. </s> literal"
    ids = m.tokenize(text)
    assert m.eod not in ids and m.detokenize(ids) == text
    assert m.offsets(ids, text)[0] == 0 and m.offsets(ids, text) == sorted(m.offsets(ids, text))
    assert m.unique_identifiers["tokenizer_path"] == synth.tokenizer_dir
    # pad == eos (a common HF convention) is reported as "no pad" (-1), so EOS is never loss-masked as padding
    t2 = load_tokenizer(synth.tokenizer_dir)
    t2.pad_token = t2.eos_token
    assert MegatronHFTokenizer(t2).pad == -1
    # a different vocabulary gives a different cache identity
    t3 = load_tokenizer(synth.tokenizer_dir)
    t3.add_tokens(["<extra>"])
    assert MegatronHFTokenizer(t3).unique_identifiers != m.unique_identifiers


def test_gpt_dataset_over_prepared_data(tok, synth, tmp_path):
    assert not torch.distributed.is_initialized()
    train, valid, test = build(synth.prefix, MegatronHFTokenizer(tok), tmp_path / "cache")
    assert isinstance(train, GPTDataset) and valid is None and test is None and len(train) >= 40
    assert any((tmp_path / "cache").rglob("*.npy"))  # megatron cached its indices

    # Every sample is a window of the documents, concatenated in megatron's document order.
    docs = IndexedDataset(synth.prefix)
    stream = np.concatenate([docs[int(d)] for d in train.document_index])
    starts = np.concatenate([[0], np.cumsum([docs.sequence_lengths[int(d)] for d in train.document_index])])
    saw_eod = False
    for i in range(12):
        s = train[i]
        tokens, labels = s["tokens"], s["labels"]
        assert tokens.shape == labels.shape == (SEQ,)
        assert torch.equal(labels[:-1], tokens[1:])  # labels are tokens shifted by one
        j = int(train.shuffle_index[i])
        doc_pos, offset = train.sample_index[j]
        begin = starts[doc_pos] + offset
        window = torch.from_numpy(stream[begin:begin + SEQ + 1].astype(np.int64))
        assert torch.equal(tokens, window[:-1]) and torch.equal(labels, window[1:])
        assert torch.equal(s["loss_mask"], torch.ones(SEQ))  # pad id 3 never occurs, EOS is trained on
        saw_eod |= bool((tokens == tok.eos_token_id).any())
    assert saw_eod

    # Same seed and data: the cached indices are reused and give the same samples.
    again, _, _ = build(synth.prefix, MegatronHFTokenizer(tok), tmp_path / "cache")
    assert torch.equal(again[3]["tokens"], train[3]["tokens"])


def test_eod_reaches_the_loss_mask(tok, synth, tmp_path):
    train, _, _ = build(synth.prefix, MegatronHFTokenizer(tok), tmp_path / "c2", eod_mask_loss=True)
    for i in range(8):
        s = train[i]
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == tok.eos_token_id)
