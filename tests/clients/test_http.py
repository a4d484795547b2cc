"""The HTTP client against the real server, plus retry behaviour on a transport that fails first."""

import asyncio

import httpx
import pytest

from clients.http import APIError, AsyncClient, Client


def test_sync_client_complete_stream_logprobs_and_listing(server):
    c = Client(server.url)
    full = c.complete("The capital of France is", max_tokens=6, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.stream("The capital of France is", max_tokens=6, temperature=0))
    assert streamed == full.choices[0].text and full.usage.completion_tokens == 6
    lp = c.logprobs_of("One two three")[0]
    assert "".join(lp.tokens) == "One two three" and lp.logprobs[0] is None and all(v < 0 for v in lp.logprobs[1:])
    assert "t_clamp" in {p.name for p in c.profiles().data}
    assert any(m.id == "gemma-3-270m:t_clamp" for m in c.models().data)


def test_profile_as_field_or_model_name_gives_the_same_text(server):
    a = Client(server.url).complete("Hermione", "t_sae_only", max_tokens=5, temperature=0)
    b = Client(server.url, model="gemma-3-270m", profile_via="model").complete("Hermione", "t_sae_only", max_tokens=5,
                                                                             temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.profile == b.profile == "t_sae_only"


def test_server_error_message_is_carried(server):
    with pytest.raises(APIError) as e:
        Client(server.url).complete("x", "no_such_profile")
    assert e.value.status == 400 and e.value.param == "profile" and "known profiles" in e.value.message


def test_async_client_runs_requests_concurrently(server):
    async def main():
        c = AsyncClient(server.url, concurrency=4)
        try:
            rs = await asyncio.gather(*(c.complete(f"Count: {i},", max_tokens=3, temperature=0) for i in range(6)))
            return [r.choices[0].text for r in rs]
        finally:
            await c.aclose()
    assert len(asyncio.run(main())) == 6


def test_retries_on_503_then_succeeds_and_gives_up_on_400():
    calls = []

    def handler(request):
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503, json={"error": {"message": "busy", "type": "server_error"}})
        return httpx.Response(200, json={"object": "list", "data": []})
    c = Client("http://test", backoff=0.001)
    c.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    assert c.models().data == [] and len(calls) == 3

    c.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(
        lambda r: httpx.Response(400, json={"error": {"message": "bad thing", "type": "invalid_request_error"}})))
    with pytest.raises(APIError, match="bad thing"):
        c.models()


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(APIError, match="cannot reach"):
        Client("http://127.0.0.1:9", retries=1, backoff=0.001).models()
