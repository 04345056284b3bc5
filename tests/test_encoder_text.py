"""The serving-side text encoder (ONNX Runtime) on the bundled MiniLM export."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from colgrid_server.encoders import EncodedText, TextEncoder, load_encoder
from colgrid_server.errors import FailedPrecondition, InvalidArgument

PASSAGES = [
    "Late interaction keeps one vector per token and scores with MaxSim.",
    "Short one.",
    "The inverted file maps each centroid to the documents that have a token near it, so a query "
    "only scores documents sharing a centroid with one of its tokens.",
    "Zarr stores chunked, compressed N-dimensional arrays.",
]


def test_encoder_describes_itself(text_encoder: TextEncoder, encoder_dir: Path) -> None:
    assert (text_encoder.kind, text_encoder.dim, text_encoder.path) == ("colbert", 384, encoder_dir)
    assert text_encoder.spec.name == "all-MiniLM-L6-v2"


def test_one_unit_norm_row_per_token(text_encoder: TextEncoder) -> None:
    for encoded in text_encoder.encode_documents(PASSAGES):
        assert encoded.vectors.dtype == np.float32 and encoded.vectors.shape[1] == 384
        np.testing.assert_allclose(np.linalg.norm(encoded.vectors, axis=1), 1.0, atol=1e-5)


def test_special_tokens_are_dropped(text_encoder: TextEncoder) -> None:
    (encoded,) = text_encoder.encode_queries(["What is late interaction?"])
    assert encoded.tokens == ["what", "is", "late", "interaction", "?"]


def test_spans_map_back_to_the_wordpieces(text_encoder: TextEncoder) -> None:
    text = "Tokenizers split unbelievably long words, like antidisestablishmentarianism, into pieces!"
    (encoded,) = text_encoder.encode_documents([text])
    assert any(t.startswith("##") for t in encoded.tokens)
    for token, (start, end) in zip(encoded.tokens, encoded.spans.tolist()):
        assert text[start:end].lower() == token.removeprefix("##")


def test_spans_are_character_offsets_into_non_ascii_text(text_encoder: TextEncoder) -> None:
    text = "Zürich café"
    (encoded,) = text_encoder.encode_queries([text])
    assert [text[s:e] for s, e in encoded.spans.tolist()] == ["Zürich", "café"]


def test_results_come_back_in_input_order_whatever_the_batching(text_encoder: TextEncoder) -> None:
    one_by_one = [text_encoder.encode_documents([p])[0] for p in PASSAGES]
    batched = text_encoder.encode_documents(PASSAGES, batch_size=3)
    for alone, together in zip(one_by_one, batched):
        assert together.tokens == alone.tokens
        np.testing.assert_allclose(together.vectors, alone.vectors, atol=1e-5)


def test_long_documents_are_truncated_to_document_max_length(text_encoder: TextEncoder) -> None:
    (encoded,) = text_encoder.encode_documents(["word " * 1000])
    # document_max_length counts model positions; [CLS] and [SEP] take two and are dropped.
    assert encoded.vectors.shape[0] == text_encoder.spec.document_max_length - 2


def test_long_queries_are_truncated_to_query_max_length(text_encoder: TextEncoder) -> None:
    (encoded,) = text_encoder.encode_queries(["word " * 100])
    assert encoded.vectors.shape[0] == text_encoder.spec.query_max_length - 2


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text_is_invalid(text_encoder: TextEncoder, text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        text_encoder.encode_queries(["fine", text])
    assert err.value.field == "texts[1]"


def test_text_without_tokens_is_invalid(text_encoder: TextEncoder) -> None:
    with pytest.raises(InvalidArgument, match="no tokens") as err:
        text_encoder.encode_documents(["\x00\x01\ufeff"])
    assert err.value.field == "texts[0]"


def test_a_single_string_is_not_mistaken_for_a_sequence(text_encoder: TextEncoder) -> None:
    with pytest.raises(InvalidArgument):
        text_encoder.encode_queries("one string")  # type: ignore[arg-type]


def test_no_texts_give_no_results(text_encoder: TextEncoder) -> None:
    assert text_encoder.encode_documents([]) == []


def test_concurrent_callers_get_the_same_results_as_one_caller(text_encoder: TextEncoder) -> None:
    expected = text_encoder.encode_documents(PASSAGES)
    results: dict[int, list[EncodedText]] = {}

    def work(i: int) -> None:
        results[i] = text_encoder.encode_documents(PASSAGES[i % 4:] + PASSAGES[:i % 4], batch_size=2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        for a, b in zip(got, PASSAGES[i % 4:] + PASSAGES[:i % 4]):
            want = expected[PASSAGES.index(b)]
            assert a.tokens == want.tokens
            np.testing.assert_allclose(a.vectors, want.vectors, atol=1e-5)
    assert len(results) == 8


def test_automatic_providers_end_with_cpu(text_encoder: TextEncoder) -> None:
    import onnxruntime as ort

    assert text_encoder.providers[-1] == "CPUExecutionProvider"
    assert set(text_encoder.providers) <= set(ort.get_available_providers())


def test_explicit_cpu_provider_is_used(encoder_dir: Path) -> None:
    encoder = load_encoder(encoder_dir, providers=["CPUExecutionProvider"], threads=1)
    assert encoder.providers == ["CPUExecutionProvider"]


def test_an_unknown_provider_is_invalid(encoder_dir: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        load_encoder(encoder_dir, providers=["NoSuchExecutionProvider"])
    assert err.value.field == "providers"


def test_requested_cuda_is_used_or_refused_never_silently_cpu(encoder_dir: Path) -> None:
    try:
        encoder = load_encoder(encoder_dir, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except FailedPrecondition as exc:
        assert "CUDAExecutionProvider" in str(exc)
    except InvalidArgument as exc:  # a CPU-only onnxruntime build does not list CUDA at all
        assert exc.field == "providers"
    else:
        assert encoder.providers[0] == "CUDAExecutionProvider"


_SERVING_PROBE = """
import json, sys
from colgrid_server.encoders import load_encoder
encoder = load_encoder(sys.argv[1])
encoder.encode_queries(["which modules are loaded"])
encoder.encode_documents(["serving needs onnxruntime, tokenizers and numpy only"])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))
"""


def test_serving_path_imports_neither_torch_nor_transformers(encoder_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _SERVING_PROBE, str(encoder_dir)], check=True,
                         capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
