from server.engine.detokenizer import IncrementalDetokenizer


class _ByteTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=True, **kw):
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_one_token_completing_two_stop_strings_cuts_at_the_first():
    """The text ends at the first place any stop string occurs, whatever their lengths or order."""
    tok = _ByteTokenizer({1: b"xbcd", 9: b"z"})
    for stop in (("cd", "b"), ("b", "cd")):
        d = IncrementalDetokenizer(tok, [9], stop)
        text, hit = d.add(1)
        assert hit and text + d.finish() == "x", stop
