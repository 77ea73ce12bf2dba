"""`Text`, a request's generated text kept as pieces: every read equals the same reads of a plain string."""

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends.engine.request import Text


class SmallFold(Text):
    FOLD = 3  # folds every few pieces, so the examples cross many


_ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.text(max_size=4)),
    st.tuples(st.just("slice"), st.integers(0, 60), st.integers(0, 60)),
    st.tuples(st.just("cut"), st.integers(0, 60)),
    st.tuples(st.just("copy")),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=5), _ops)
def test_text_reads_as_the_plain_string_would(initial, ops):
    text, plain = SmallFold(initial), initial
    for op in ops:
        if op[0] == "append":
            text.append(op[1])
            plain += op[1]
        elif op[0] == "slice":
            a, b = sorted(op[1:])
            b = min(b, len(plain))
            assert text.slice(a, b) == plain[a:b]
        elif op[0] == "cut":
            text.cut(op[1])
            plain = plain[:op[1]]
        else:
            twin = text.copy()
            twin.append("x")  # the copy goes its own way
            assert str(twin) == plain + "x"
        assert len(text) == len(plain) and str(text) == plain


def test_a_reader_on_another_thread_always_sees_a_prefix_of_the_text():
    """The engine thread appends (folding every FOLD pieces) while a reader slices up to the length it
    read first, as a stream's reader does: every slice is the prefix it asked for."""
    text = SmallFold()
    pieces = [f"{i % 10}" * (i % 3 + 1) for i in range(20_000)]
    full = "".join(pieces)
    done = threading.Event()
    bad: list[tuple[int, str]] = []

    def writer() -> None:
        for p in pieces:
            text.append(p)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        n = len(text)
        got = text.slice(max(0, n - 50), n)
        if got != full[max(0, n - 50):n]:
            bad.append((n, got))
    t.join()
    assert not bad and str(text) == full
