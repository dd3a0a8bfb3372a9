"""vLLM's helper endpoints on the REST facade: /tokenize, /detokenize and /version."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from moemesh.model.tokenizer import Tokenizer
from moemesh.version import package_version
from tests.service.gateway.doubles import MAX_MODEL_LEN, make_tokenizer_dir
from tests.service.gateway.rest_doubles import error_of, rest_mesh

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokens") / "tok")


def test_tokenize_and_detokenize_round_trip_as_the_tokenizer_does(model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)

    async def main() -> None:
        async with rest_mesh(model_dir) as (_, client):
            r = (await client.post("/tokenize", json={"prompt": "The mesh is"})).json()
            assert r["tokens"] == tok.encode("The mesh is") and r["count"] == len(r["tokens"])
            assert r["max_model_len"] == MAX_MODEL_LEN
            bare = (await client.post("/tokenize", json={"prompt": "The mesh is", "add_special_tokens": False}))
            assert bare.json()["tokens"] == tok.encode("The mesh is", add_special_tokens=False)
            messages = [{"role": "user", "content": "Hi!"}]
            chat = (await client.post("/tokenize", json={"model": "tok", "messages": messages})).json()
            assert chat["tokens"] == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
            back = (await client.post("/detokenize", json={"tokens": r["tokens"]})).json()
            assert back == {"prompt": tok.decode(r["tokens"], skip_special_tokens=False)}
            assert "The mesh is" in back["prompt"]
            assert (await client.get("/version")).json() == {"version": package_version()}
            # Bad input: a 400 naming the field, never a traceback.
            assert error_of(await client.post("/tokenize", json={}), 400)["param"] == "prompt"
            both = {"prompt": "x", "messages": messages}
            assert error_of(await client.post("/tokenize", json=both), 400)["param"] == "prompt"
            far = error_of(await client.post("/detokenize", json={"tokens": [1, 10**6]}), 400)
            assert far["param"] == "tokens" and "tokens[1] = 1000000" in far["message"]
            assert error_of(await client.post("/detokenize", json={"tokens": [-1]}), 400)
            error_of(await client.post("/tokenize", json={"model": "other", "prompt": "x"}), 404)

    asyncio.run(main())
