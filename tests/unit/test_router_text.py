"""Incremental detokenizer and stop-string matcher."""
from __future__ import annotations

from test_router_support import encode, tokenizer

from splitserve.router.detokenizer import IncrementalDetokenizer
from splitserve.router.stop_strings import StopStringMatcher


def stream_text(ids: list[int], prompt: list[int] | None = None, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer(), prompt or [], skip_special_tokens=skip)
    deltas = [detok.add([i]) for i in ids]
    return deltas + [detok.flush()]


def test_multibyte_utf8_split_across_tokens_streams_whole_characters() -> None:
    text = "héllo 🙂日本語 naïve café🙂"
    ids = encode(text)
    assert any(tokenizer().decode([i]).endswith("\ufffd") for i in ids)  # really split bytes
    deltas = stream_text(ids, prompt=encode("hello "))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_skips_special_tokens_or_keeps_them() -> None:
    ids = encode("hello") + [tokenizer().eos_token_id] + encode(" world")
    assert "".join(stream_text(ids)) == "hello world"
    assert "".join(stream_text(ids, skip=False)) == "hello<|im_end|> world"


def test_truncated_character_is_flushed_as_replacement() -> None:
    ids = encode("🙂")[:-1]
    deltas = stream_text(ids)
    assert deltas[:-1] == [""] * len(ids) and deltas[-1] == "\ufffd"


def test_stop_string_split_across_deltas_is_held_back_and_cut() -> None:
    m = StopStringMatcher(["STOP here"])
    assert m.feed("hello ").text == "hello "
    first = m.feed("ST")
    assert first.text == "" and not first.stopped
    assert m.feed("OP").text == ""
    result = m.feed(" here and more")
    assert result.stopped and result.text == "" and result.stop_string == "STOP here"
    assert m.feed("ignored").text == "" and m.flush() == ""


def test_held_text_is_released_when_it_cannot_be_a_stop() -> None:
    m = StopStringMatcher(["abc", "xyz"])
    assert m.feed("12a").text == "12"
    assert m.feed("bd").text == "abd"
    assert m.feed("x").text == ""
    assert m.flush() == "x"


def test_earliest_stop_wins_and_text_before_it_is_kept() -> None:
    m = StopStringMatcher(["world", "lo"])
    result = m.feed("hello world")
    assert result.stopped and result.text == "hel" and result.stop_string == "lo"


def test_no_stops_passes_everything() -> None:
    m = StopStringMatcher(["", ""])
    assert m.feed("anything").text == "anything" and m.flush() == ""


def test_ids_decoder_gives_the_tokenizers_text_and_falls_back_where_it_cleans_up() -> None:
    import copy
    import random

    from splitserve.router.detokenizer import TokenText, ids_decoder

    tok = tokenizer()
    direct = ids_decoder(tok)
    text = TokenText(tok)
    assert text.eos_token_id == tok.eos_token_id is not None
    assert text.decode((5, tok.eos_token_id), skip_special_tokens=True) == tok.decode([5], skip_special_tokens=False)
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 9))]
        for skip in (True, False):
            assert direct(ids, skip) == tok.decode(ids, skip_special_tokens=skip)
    plain = copy.copy(tok)  # no clean-up: the Rust backend is called, not decode
    plain.decode = lambda ids, skip_special_tokens=False: "not called"
    assert ids_decoder(plain)([1, 2], True) == tok.decode([1, 2], skip_special_tokens=True) != "not called"
    cleaning = copy.copy(tok)
    cleaning.clean_up_tokenization_spaces = True
    cleaning.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    calls: list[list[int]] = []
    cleaning.decode = lambda ids, skip_special_tokens=False: calls.append(ids) or "cleaned"
    assert ids_decoder(cleaning)([1, 2], True) == "cleaned" and calls == [[1, 2]]
