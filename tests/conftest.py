import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from speech_lens.testing.families import FAMILIES, build_family

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    os.environ["SPEECH_LENS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
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
