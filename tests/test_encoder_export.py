"""Export: ONNX graphs reproduce the PyTorch model; failed exports leave nothing behind.

The bundled MiniLM (session fixture) is checked against transformers directly; a tiny random
ColBERT-layout checkpoint (BERT + `linear` projection, saved here) covers the projection,
markers, query augmentation and the failure paths in well under a second per export.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertPreTrainedModel

from colgrid_server.encoders import (EncoderSpec, TextEncoder, bundled_checkpoint, export_text_encoder,
                                     load_encoder, load_spec)
from colgrid_server.errors import EncoderError, FailedPrecondition, InvalidArgument

PROJECTION_DIM = 16
TEXTS = [
    "Exact MaxSim sums, over query tokens, the best dot product with any document token.",
    "tiny",
    "Centroids come from k-means over a sample of token vectors; hnswlib finds the nearest ones. " * 6,
    "Zürich, São Paulo & Kraków: ünïcödé, digits 3.14159 and punctuation (!?).",
    "The quick brown fox jumps over the lazy dog.",
]


class TinyColBERT(BertPreTrainedModel):
    """The layout of ColBERT's Hugging Face checkpoints: `bert.*` weights plus `linear.weight`."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.linear = torch.nn.Linear(config.hidden_size, PROJECTION_DIM, bias=False)
        self.post_init()

    def token_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.nn.functional.normalize(self.linear(hidden), dim=-1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    path = tmp_path_factory.mktemp("tiny-colbert")
    TinyColBERT(config).save_pretrained(path)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_checkpoint() / name, path / name)
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    out = tmp_path_factory.mktemp("tiny-export") / "tiny-colbert"
    export_text_encoder(tiny_checkpoint, out, query_marker="[unused0] ", document_marker="[unused1] ",
                        query_augment=True, query_max_length=16, progress=False)
    return load_encoder(out)


@pytest.fixture(scope="module")
def minilm() -> tuple:
    return (AutoTokenizer.from_pretrained(bundled_checkpoint(), local_files_only=True),
            AutoModel.from_pretrained(bundled_checkpoint(), local_files_only=True).eval())


def _minilm_rows(minilm: tuple, text: str) -> np.ndarray:
    """Reference: transformers alone, one text, no padding; [CLS]/[SEP] rows dropped."""
    tokenizer, model = minilm
    inputs = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden, dim=-1)[1:-1].numpy()


def _min_cosine(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.min(np.sum(got * want, axis=1)))


# --- bundled MiniLM ---------------------------------------------------------------------------

def test_export_records_parity_at_least_0999(text_encoder: TextEncoder) -> None:
    parity = text_encoder.spec.parity
    assert parity is not None and parity.min_token_cosine >= 0.999 and parity.tokens > 256


def test_default_encoder_is_minilm_colbert_style(text_encoder: TextEncoder) -> None:
    spec = text_encoder.spec
    assert (spec.kind, spec.name, spec.dim, spec.document_max_length) == ("colbert", "all-MiniLM-L6-v2", 384, 256)
    assert spec.source_sha256 and "torch" in spec.exported_with


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_onnx_token_vectors_match_transformers(text_encoder: TextEncoder, minilm: tuple, batch_size: int) -> None:
    # Padded batches of several sizes and lengths other than the trace's: the axes are dynamic.
    encoded = text_encoder.encode_documents(TEXTS, batch_size=batch_size)
    for text, got in zip(TEXTS, encoded):
        assert _min_cosine(got.vectors, _minilm_rows(minilm, text)) >= 0.999


def test_tokenizer_ids_match_autotokenizer(encoder_dir: Path, minilm: tuple) -> None:
    exported = Tokenizer.from_file(str(encoder_dir / "tokenizer.json"))
    texts = TEXTS + ["word " * 400]
    want = minilm[0](texts, truncation=True, max_length=256, padding=True)
    got = exported.encode_batch(texts)
    assert [e.ids for e in got] == want["input_ids"]
    assert [e.attention_mask for e in got] == want["attention_mask"]


def test_exported_tokenizer_pads_to_longest_not_a_fixed_length(encoder_dir: Path) -> None:
    # The shipped tokenizer.json pads and truncates at a fixed 128.
    exported = Tokenizer.from_file(str(encoder_dir / "tokenizer.json"))
    assert len(exported.encode_batch(["two words", "three words here"])[0].ids) == 5
    assert len(exported.encode("word " * 400).ids) == 256


def test_default_encoder_is_reused_not_re_exported(encoder_dir: Path) -> None:
    from colgrid_server.encoders import ensure_default_encoder

    before = (encoder_dir / "model.onnx").stat().st_mtime_ns
    assert ensure_default_encoder(encoder_dir.parent.parent) == encoder_dir
    assert (encoder_dir / "model.onnx").stat().st_mtime_ns == before


# --- ColBERT layout (tiny random checkpoint) --------------------------------------------------

def test_projection_sets_the_dimension(tiny_encoder: TextEncoder) -> None:
    assert tiny_encoder.dim == PROJECTION_DIM
    assert tiny_encoder.encode_documents(["a b c"])[0].vectors.shape == (4, PROJECTION_DIM)


def test_projected_documents_match_the_pytorch_model(tiny_encoder: TextEncoder, tiny_checkpoint: Path) -> None:
    model = TinyColBERT.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for text, got in zip(TEXTS, tiny_encoder.encode_documents(TEXTS, batch_size=5)):
        # ColBERT's layout: [CLS] [D] text [SEP], with [D] = [unused1].
        words = tokenizer(text, add_special_tokens=False)["input_ids"][: 256 - 3]
        ids = torch.tensor([[tokenizer.cls_token_id, tokenizer.convert_tokens_to_ids("[unused1]"),
                             *words, tokenizer.sep_token_id]])
        with torch.inference_mode():
            want = model.token_vectors(ids, torch.ones_like(ids))[0, 1:-1].numpy()
        assert _min_cosine(got.vectors, want) >= 0.999


def test_query_augmentation_pads_with_unattended_masks(tiny_encoder: TextEncoder, tiny_checkpoint: Path) -> None:
    (got,) = tiny_encoder.encode_queries(["short query"])
    assert got.tokens == ["[unused0]", "short", "query"] + ["[MASK]"] * 11  # 16 positions - [CLS], [SEP]
    model = TinyColBERT.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = [tokenizer.cls_token_id, tokenizer.convert_tokens_to_ids("[unused0]"),
           *tokenizer("short query", add_special_tokens=False)["input_ids"], tokenizer.sep_token_id]
    mask = [1] * len(ids) + [0] * (16 - len(ids))
    ids += [tokenizer.mask_token_id] * (16 - len(ids))
    with torch.inference_mode():
        want = model.token_vectors(torch.tensor([ids]), torch.tensor([mask]))[0].numpy()
    keep = [i for i in range(16) if i not in (0, 4)]  # drop [CLS] and [SEP]
    assert _min_cosine(got.vectors, want[keep]) >= 0.999


def test_marker_rows_have_no_span_and_text_spans_skip_the_marker(tiny_encoder: TextEncoder) -> None:
    text = "marker free text"
    (got,) = tiny_encoder.encode_documents([text])
    assert got.tokens[0] == "[unused1]" and got.spans[0].tolist() == [-1, -1]
    assert [text[s:e] for s, e in got.spans[1:].tolist()] == ["marker", "free", "text"]


def test_text_of_only_a_marker_is_still_invalid(tiny_encoder: TextEncoder) -> None:
    with pytest.raises(InvalidArgument, match="no tokens"):
        tiny_encoder.encode_queries(["\x00"])


# --- failures leave nothing behind ------------------------------------------------------------

def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_refuses_a_non_empty_out_dir_and_leaves_it_alone(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="not empty"):
        export_text_encoder(tiny_checkpoint, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _leftovers(tmp_path) == []


def test_export_into_an_existing_empty_dir_succeeds(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    report = export_text_encoder(tiny_checkpoint, out, progress=False)
    assert isinstance(load_spec(out), EncoderSpec) and report.path == out


def test_failed_parity_raises_with_the_figure_and_writes_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(EncoderError, match=r"min per-token cosine [01]\.\d{7} < 1\.5"):
        export_text_encoder(tiny_checkpoint, out, min_token_cosine=1.5, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_directory_without_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        export_text_encoder(tmp_path, tmp_path / "out", progress=False)
    assert err.value.field == "checkpoint" and not (tmp_path / "out").exists()


def test_report_matches_the_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "reported"
    report = export_text_encoder(tiny_checkpoint, out, name="tiny", progress=False)
    spec = load_spec(out)
    assert report.encoder_id == load_encoder(out).id
    assert (report.min_token_cosine, report.max_abs_diff) == (spec.parity.min_token_cosine, spec.parity.max_abs_diff)
    assert spec.name == "tiny" and report.seconds > 0


# --- default encoder and progress output ------------------------------------------------------

def test_bundled_checkpoint_is_a_local_checkpoint() -> None:
    path = bundled_checkpoint()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_an_invalid_default_encoder_is_exported_again(tmp_path: Path) -> None:
    from colgrid_server.encoders import ensure_default_encoder

    broken = tmp_path / "encoders" / "all-MiniLM-L6-v2"
    broken.mkdir(parents=True)
    (broken / "encoder.json").write_text("{ half written")
    assert ensure_default_encoder(tmp_path) == broken
    assert load_encoder(broken).encode_queries(["works again"])[0].vectors.shape == (2, 384)
    assert _leftovers(broken.parent) == []


def test_progress_false_prints_nothing(tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    export_text_encoder(tiny_checkpoint, tmp_path / "quiet", progress=False)
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_progress_shows_the_export_steps(tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    export_text_encoder(tiny_checkpoint, tmp_path / "loud", name="loud", progress=True)
    err = capfd.readouterr().err
    assert "export loud" in err and "checking parity" in err and "5/5" in err
