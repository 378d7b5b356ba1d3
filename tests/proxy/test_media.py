"""Images, transcriptions, translations and speech through the proxy, driven by the
real `openai` package against the stand-in upstream: each is reserved on what it is
priced by and recorded with the right units (images, milliseconds of audio, audio
tokens, characters), at the price the catalog gives for them."""
from __future__ import annotations

import openai
import pytest

import p402core
from tests.support.openai_standin import IMAGE_TOKENS

CATALOG = p402core.Catalog.default()
AUDIO = b"\x00" * 64_000  # 16 s at the stand-in's 32 kbit/s


async def test_image_generation_is_priced_per_image_of_its_size_and_quality(rig):
    client = rig.openai(x_p402_customer="acme", x_p402_feature="thumbnails")
    r = await client.images.generate(model="gpt-image-1", prompt="a red fox", n=2,
                                     size="1024x1024", quality="low")
    assert len(r.data) == 2
    sent = rig.upstream.last("/v1/images/generations").body
    assert sent["n"] == 2 and sent["quality"] == "low"  # forwarded as sent
    [ev] = await rig.events()
    assert ev.model == "low/1024-x-1024/gpt-image-1"
    assert ev.usage.units["images"] == 2
    assert ev.usage.output_tokens == 2 * IMAGE_TOKENS  # the answer's token usage, kept
    want = CATALOG.cost_nanos("low/1024-x-1024/gpt-image-1", images=2,
                              input_tokens=ev.usage.input_tokens,
                              output_tokens=2 * IMAGE_TOKENS,
                              image_output_tokens=2 * IMAGE_TOKENS)
    assert want > 0 and ev.cost_nanos == want
    assert ev.owners.feature == "thumbnails"


async def test_image_edit_is_multipart_and_metered(rig):
    client = rig.openai(x_p402_customer="acme")
    r = await client.images.edit(model="gpt-image-1", image=("in.png", b"\x89PNG" + bytes(500)),
                                 prompt="add a hat", size="1024x1536", quality="medium")
    assert len(r.data) == 1
    got = rig.upstream.last("/v1/images/edits")
    assert got.body["image"] == {"filename": "in.png", "size": 504}  # the file arrived
    [ev] = await rig.events()
    assert ev.model == "medium/1024-x-1536/gpt-image-1" and ev.usage.units["images"] == 1
    assert ev.cost_nanos == CATALOG.cost_nanos(
        ev.model, images=1, input_tokens=ev.usage.input_tokens,
        image_input_tokens=ev.usage.units.get("image_input_tokens", 0),
        output_tokens=ev.usage.output_tokens, image_output_tokens=IMAGE_TOKENS)


async def test_an_image_the_budget_cannot_pay_for_is_refused_before_the_call(rig):
    per_image = CATALOG.cost_nanos("low/1024-x-1024/gpt-image-1", images=1)
    await rig.admin.put_budget("acme-img", limit_nanos=per_image * 3, period="TOTAL",
                               enforcement="HARD", scope={"customer": "acme"})
    client = rig.openai(x_p402_customer="acme")
    await client.images.generate(model="gpt-image-1", prompt="x", n=2, size="1024x1024",
                                 quality="low")
    with pytest.raises(openai.APIStatusError) as info:
        await client.images.generate(model="gpt-image-1", prompt="x", n=2,
                                     size="1024x1024", quality="low")
    assert info.value.status_code == 402
    assert len(rig.upstream.requests) == 1  # the second never reached the provider


@pytest.mark.parametrize("endpoint", ["transcriptions", "translations"])
async def test_whisper_is_priced_by_the_duration_it_reports(rig, endpoint):
    client = rig.openai(x_p402_customer="acme")
    api = getattr(client.audio, endpoint)
    r = await api.create(model="whisper-1", file=("a.mp3", AUDIO))
    assert r.text
    [ev] = await rig.events()
    assert ev.usage.units == {"audio_ms": 16_000}
    assert ev.cost_nanos == CATALOG.cost_nanos("whisper-1", audio_ms=16_000) == 1_600_000


async def test_token_priced_transcription_and_plain_text_answers(rig):
    client = rig.openai(x_p402_customer="acme")
    await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", AUDIO))
    [ev] = await rig.events()
    assert ev.usage.units == {"audio_input_tokens": 160}
    assert ev.cost_nanos == CATALOG.cost_nanos(
        "gpt-4o-transcribe", input_tokens=160, audio_input_tokens=160,
        output_tokens=ev.usage.output_tokens)
    assert ev.evidence.value == "REPORTED"
    # a plain-text answer reports nothing: the reservation (declared duration) stands
    text = await client.audio.transcriptions.create(
        model="whisper-1", file=("b.mp3", AUDIO), response_format="text",
        extra_headers={"x-p402-audio-ms": "16500"})
    assert isinstance(text, str)
    ev2 = (await rig.events(2))[-1]
    assert ev2.usage.units["audio_ms"] == 16_500 and ev2.evidence.value == "ESTIMATED"


async def test_speech_is_priced_per_character(rig):
    client = rig.openai(x_p402_customer="acme")
    text = "Hello from P402, naïvely."
    r = await client.audio.speech.create(model="tts-1", voice="alloy", input=text)
    assert r.content.startswith(b"ID3")
    [ev] = await rig.events()
    assert ev.usage.units["characters"] == len(text)
    assert ev.cost_nanos == CATALOG.cost_nanos("tts-1", characters=len(text),
                                               input_tokens=ev.usage.input_tokens,
                                               output_tokens=ev.usage.output_tokens)
    assert ev.cost_nanos == len(text) * 15_000  # 15 USD per million characters
    assert ev.evidence.value == "ESTIMATED"  # speech answers carry no usage


@pytest.mark.parametrize("call,code,param", [
    (lambda c: c.images.generate(model="gpt-image-1", prompt="x", n=11), 400, "n"),
    (lambda c: c.audio.speech.create(model="tts-1", voice="alloy", input=""), 400, "input"),
])
async def test_bad_media_requests_name_the_field(rig, call, code, param):
    with pytest.raises(openai.APIStatusError) as info:
        await call(rig.openai(x_p402_customer="acme"))
    assert info.value.status_code == code
    assert info.value.response.json()["error"]["param"] == param
    assert rig.upstream.requests == []
