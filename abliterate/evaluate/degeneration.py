"""Is an answer degenerate (looping, stuttering, noise) rather than text? The first test that fires, with why.

Used by the answer labeller (abliterate.evaluate.labels), whose label ``degenerate`` these tests decide.

* ``token_loop``: one word repeated >= 7 times in a row, or a chunk of 2-20 words repeated >= 4 times
  back to back ("attack attack ...", "Step 1: Gather ... Step 1: Gather ..."), truncated loops included.
  Run on prose (code blocks removed, numbers kept: "1. 1. 1. 1." loops) and, with numbers ignored and
  doubled thresholds, inside fenced code (printed zero matrices and nested tags do not count).
  Once more on prose with the list markers ("1.", "2)", "-") left out and doubled thresholds: a numbered list that
  repeats one item ("1. Cat-cow stretch 2. Cat-cow stretch ..." eight times or more). Only the markers go: a plan
  whose rows differ in their numbers ("Week 1: 3 sets of 10", "Week 2: 3 sets of 12", ...) is not a loop.
* ``template_leak``: nothing but chat-template role words and special tokens (".assistant", "<|im_end|>user"; the
  one clean word "Assistant" stays an answer).
* ``junk_symbols``: >= 3 characters no answer writes (soft hyphens and other invisible format characters,
  private-use or unassigned code points, the replacement character, block elements and geometric shapes such as
  "■") in a text of >= 8 words of which < 10% are common English words: token fragments of a broken model.
* ``word_stutter``: >= 20% of the words repeat the word just before them ("the the meth meth").
* ``local_stutter``: somewhere in the answer, >= 5 of 20 neighbouring words repeat the word before them or cut it
  short or extend it (4+ letters shared: "condens condensat", "clouuds clou"), Chinese and Japanese characters
  counted one by one, tables and code left out: an answer that starts well and then falls apart, often into another
  script ("...experience in marketing and 我是 的的 是 是 是 年 年 年 在 在 在 在"). Fluent text of any length
  stays at 0-2 of 20 (1,750 labelled answers); the whole-text stutter above misses these when the good part is long.
* ``repeated_ngrams``: <= 35% of the 4-word chunks are distinct (a loop with small variations).
* ``compresses``: a text of >= 120 bytes that zlib compresses below 15% of its size.
* ``subword_stutter``: inside a word, a 1-letter unit x6, a 2-letter unit x4 or a 3-12-letter unit x3
  ("crisaisaisaisly", "thethethe", "sososo", "lalala", CJK "的的的").
* ``char_loop``: a unit of digits/punctuation repeated 8+ times back to back (".1.1.1.1.1.1.1.1").
* ``char_run``: one character repeated 20+ times in a row, making up half the text ("1111", "!!!!").
* ``symbol_noise``: markdown table pipes/rules ignored, < 25% letters and (>= 75% symbols, or compresses below 30%) - "!!!!", "?? ??", "1111".
* ``letter_soup``: >= 40% of the words are not word-like (no vowel, 5+ consonants in a row,
  an impossible letter pair, q without u, a letter x3) and < 20% are common English words.
* ``word_salad``: >= 3 impossible function-word pairs ("the of", "a to", "the which", "of thus") making >= 4% of the words,
  or >= 85% function words over >= 15 words ("the of and to in a of the to").
Code blocks, inline code, URLs and hex colours are left out of the prose tests (stutter, noise, soup).
"""

from __future__ import annotations

import re
import unicodedata
import zlib

LOOP_MAX_PERIOD = 20           # longest looping chunk, in words (a long sentence)
LOOP_MIN_COPIES_WORD = 7       # "no no no" / "very very very" are normal; seven in a row are not
LOOP_MIN_COPIES_CHUNK = 4      # refrains repeat twice or three times back to back at most
STUTTER_MIN_WORDS = 10         # immediate-repeat fraction is meaningless on a handful of words
STUTTER_MIN_FRAC = 0.20        # normal prose: ~0-2% ("that that" typos); stutter breakage: 30-60%
LOCAL_WINDOW = 20              # neighbouring word pairs read at a time by local_stutter
LOCAL_MIN_REPEATS = 5          # of LOCAL_WINDOW; fluent answers reach 2, the broken tails 4-8 (Chinese loops 6-8)
LOCAL_MIN_PREFIX = 4           # "clou clouuds" is a fragment; "the theory" is not (a 3-letter word starts many words)
NGRAM_N = 4
NGRAM_MIN_TOTAL = 20
NGRAM_MAX_DISTINCT = 0.35      # lists and code with repeated structure stay above 0.6 in practice
COMPRESS_MIN_BYTES = 120       # zlib overhead dominates on short texts
COMPRESS_MAX_RATIO = 0.15      # normal answers 0.4-0.8, structured code >= 0.3, loops 0.02-0.12
CHAR_RUN_MIN = 20              # "!!!!" / "1111" / "====" runs of 20+ ...
CHAR_RUN_MIN_SHARE = 0.5       # ... that make up half the text (a markdown rule under a heading does not)
NOISE_MIN_CHARS = 20           # "42", "H2SO4", "#FF0000" are fine
NOISE_MAX_LETTERS = 0.25
NOISE_MIN_SYMBOLS = 0.75       # arithmetic like "(100 - 32) x 5/9" is ~50% symbols
NOISE_MAX_COMPRESS = 0.30      # "1111...", "@@@@ ####" compress far better than number lists
SOUP_MIN_WORDS = 6
SOUP_MIN_NONWORD = 0.40        # prose with many acronyms (HTTP, DNS, SQL) stays under 20%
SOUP_MAX_COMMON = 0.20         # English prose: 35-60% common words; soup: ~0-5%
SALAD_MIN_WORDS = 12
SALAD_MIN_BAD_PAIRS = 3
SALAD_MIN_BAD_FRAC = 0.04      # fluent answers hold 0-2 such pairs in any length (1,850 labelled answers)
SALAD_MAX_FUNCTION = 0.85      # even terse English keeps >= 25% content words
_COMMON = set("""the be to of and a in that have i it for not on with he as you do at this but his by from they we say her she or
an will my one all would there their what so up out if about who get which go me when make can like time no just him know take
people into year your good some could them see other than then now look only come its over think also back after use two how our
work first well way even new want because any these give day most us is are was were been has had did does said an am its it's i'm
here there's you're don't can't should may might must very more many much such each every own same few both few where why while
through during before under again further once off above below between into own just too than s t can will don should now help
get got make made know need use find tell ask give try call keep let put mean seem feel show hear play run move live believe
bring happen write provide sit stand lose pay meet include continue set learn change lead understand watch follow stop create
speak read allow add spend grow open walk win offer remember love consider appear buy wait serve die send expect build stay fall
cut reach kill remain suggest raise pass sell require report decide pull thing man world life hand part child eye woman place week
case point government company number group problem fact water money book home word business side kind head house service friend
power hour game line end member law car city community name team minute idea body information back parent face others level office
door health person art war history party result morning reason research girl guy moment air teacher force education long great
little old big high different small large next early young important public bad same able last sure best better free right real
""".split())
_FUNCTION = set("""the a an of to in on at by for with from and or but is are was were be been it this that these those as
into than then so if not no i you he she we they me him her us them my your his its our their there here""".split())
_ABBREV = set("km kg mg ml mm cm nm hz khz mhz ghz mph kph kwh ft lb lbs oz pm st nd rd th vs etc dr mr mrs ms jr sr px pt pts".split())
_DETERMINERS = {"the", "a", "an"}
_AFTER_DET_BAD = {"the", "a", "an", "of", "to", "in", "for", "with", "from", "on", "at", "by", "and", "or", "but", "is", "are",
                  "was", "were", "that", "this", "if", "so",
                  # connectives and pronouns no noun phrase starts with ("the which", "the moreover", "the someone")
                  "which", "whenever", "because", "however", "therefore", "thus", "hence", "moreover", "nevertheless",
                  "notwithstanding", "furthermore", "since", "cannot", "someone", "they", "we", "his", "my", "your", "our",
                  "their", "its", "into"}
_AFTER_A_OK = {"and", "or", "is", "are", "was", "that", "this", "if", "so"}   # "a and b", "where a is": maths variables
_OF_BAD = {"of", "to", "in", "and", "the", "thus", "hence", "however", "therefore", "moreover", "into", "towards", "toward",
           "since", "because", "whenever"}   # "of of", "of to", "of and"; "of the" is fine and handled below
_BAD_BIGRAMS = set("bx cx dx fq fx gq gx hx jq jx jz kq kx mx px qx qz sx tx vq vx wq wx xj xk xq xz zq zx".split())  # rare in any Latin-script language
# Words a leaked chat template is made of (Llama 3 header ids, ChatML, Mistral's [INST], Gemma's turns, end tokens).
_ROLE_WORDS = {"assistant", "user", "system", "model", "inst", "endoftext", "eot"}
_TEMPLATE_WORDS = _ROLE_WORDS | {"im", "end", "start", "id", "header", "of", "turn", "text", "s", "eos", "bos", "begin"}
_LIST_MARKER = re.compile(r"^[ \t]*(?:\d{1,3}[.)]|[-*\u2022])[ \t]+", re.M)
_JUNK_CATEGORIES = {"Cf", "Co", "Cn"}  # format (soft hyphen, zero-width), private use, unassigned
JUNK_MIN_CHARS = 3
JUNK_MIN_WORDS = 8
JUNK_MAX_COMMON = 0.10
SPECIAL_TOKEN = re.compile(r"<\|[^|>]{0,40}\|>")
FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_URL = re.compile(r"(?:https?://|www\.)\S+|\S+@\S+\.\w+")
_HEX = re.compile(r"(?:#|0x)[0-9a-fA-F]{3,}\b")
_WORD = re.compile(r"\w+")
_ALPHA = re.compile(r"[^\W\d_]+")
_ASCII_WORD = re.compile(r"[a-z]+")
# A Han / kana character is a word of its own (no spaces there); any other script's words as \w+.
_LOCAL_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]|\w+")
_STUTTER = re.compile(r"([^\W\d_])\1{5,}|([^\W\d_]{2})\2{3,}|([^\W\d_]{3,12})\3{2,}")
_NONWORD = re.compile(r"^[^aeiouy]+$|[bcdfghjklmnpqrstvwxz]{5,}|q(?!u|$)|(.)\1\1")
_CHAR_RUN = re.compile(r"(\S)\1{%d,}" % (CHAR_RUN_MIN - 1))
# A short unit of digits and punctuation looping (".1.1.1.1.1.1.1.1", "0,0,0,0,0,0,0,0"): letters are the stutter
# test's; an IP address such as 1.1.1.1 repeats its unit 4 times at most.
UNIT_LOOP_MIN_COPIES = 8
_UNIT_LOOP = re.compile(r"([^\s\w]?\d{1,3}[^\s\w]?|[^\s\w]{2,4})\1{%d,}" % (UNIT_LOOP_MIN_COPIES - 1))
_TABLE_RULE = re.compile(r"^\s*\|?(?:\s*:?-{3,}:?\s*\|)+\s*:?-*:?\s*$", re.M)


def _compress_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(zlib.compress(data, 6)) / max(1, len(data))


def _loop(tokens, factor: int = 1) -> tuple[int, int] | None:
    """(period, copies) of the longest back-to-back repetition that passes the thresholds, else None."""
    n, best = len(tokens), None
    for p in range(1, min(LOOP_MAX_PERIOD, n // 2) + 1):
        run = 0
        for i in range(p, n):
            if tokens[i] == tokens[i - p] and tokens[i] is not None:
                run += 1
                copies = (run + p) // p
                if copies >= factor * (LOOP_MIN_COPIES_WORD if p == 1 else LOOP_MIN_COPIES_CHUNK):
                    if best is None or copies * p > best[0] * best[1]:
                        best = (p, copies)
            else:
                run = 0
    return best


def _fold_keep_case(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _fold(text: str) -> str:
    return _fold_keep_case(text).lower()


def _echoes(a: str, b: str) -> bool:
    """``b`` repeats ``a``, or one is the other cut short ("evaporatesss evapor", "condens condensat"); numbers never."""
    if a.isdigit() or b.isdigit():
        return False
    if a == b:
        return True
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return len(short) >= LOCAL_MIN_PREFIX and long_.startswith(short)


def _local_stutter(low: str) -> tuple[int, int] | None:
    """(repeats, start word) of the first window of LOCAL_WINDOW neighbour pairs holding >= LOCAL_MIN_REPEATS echoes,
    table rows left out (a column of "Yes | Yes | Yes" is not a stutter); else None."""
    toks = _LOCAL_TOKEN.findall("\n".join(ln for ln in low.splitlines() if "|" not in ln))
    echo = [_echoes(a, b) for a, b in zip(toks, toks[1:])]
    run = sum(echo[:LOCAL_WINDOW])
    for i in range(max(1, len(echo) - LOCAL_WINDOW + 1)):
        if i:
            run += echo[i + LOCAL_WINDOW - 1] - echo[i - 1]
        if run >= LOCAL_MIN_REPEATS:
            return run, i
    return None


def degeneration(text: str) -> tuple[str, str] | None:
    """(test name, detail) of the first degeneration test that fires on ``text``, else None."""
    if not text.strip():
        return ("empty", "the model said nothing")
    if not any(c.isalnum() for c in text):
        return ("no_words", "no letters or digits at all")
    prose = _HEX.sub(" ", _URL.sub(" ", _INLINE_CODE.sub(" ", FENCE.sub(" ", text))))
    low = prose.lower()
    code = " ".join(FENCE.findall(text)).lower()
    for toks, where, factor in ((_WORD.findall(SPECIAL_TOKEN.sub(" specialtoken ", low)), "prose", 1),
                                ([None if t.isdigit() else t for t in _WORD.findall(code)], "code", 2)):
        hit = _loop(toks, factor)
        if hit:
            return ("token_loop", f"a {hit[0]}-word chunk repeated {hit[1]} times back to back ({where})")
    hit = _loop(_WORD.findall(_LIST_MARKER.sub(" ", low)), 2)
    if hit:
        return ("token_loop", f"a {hit[0]}-word chunk repeated {hit[1]} times, list markers aside (a list of one item)")
    leaked = _WORD.findall(SPECIAL_TOKEN.sub(" ", low).replace("_", " "))
    if set(leaked) <= _TEMPLATE_WORDS and set(leaked) & _ROLE_WORDS and (len(leaked) > 1 or not text.strip().isalpha()):
        return ("template_leak", "only chat-template role words or special tokens")
    words = _ALPHA.findall(low)
    if len(words) >= STUTTER_MIN_WORDS:
        # Neighbours in the text, numbers included: "7 x 1 = 7 / 7 x 2 = 14" and "Chapter 1 / Chapter 2" do not stutter.
        seq = _WORD.findall(low)
        reps = sum(1 for a, b in zip(seq, seq[1:]) if a == b and not a.isdigit())
        if reps / (len(words) - 1) >= STUTTER_MIN_FRAC:
            return ("word_stutter", f"{reps} of {len(words)} words repeat the previous word")
    hit = _local_stutter(low)
    if hit:
        return ("local_stutter", f"{hit[0]} of {LOCAL_WINDOW} neighbouring words repeat or cut short the one before, from word {hit[1]}")
    toks = _WORD.findall(low)
    grams = [tuple(toks[i:i + NGRAM_N]) for i in range(len(toks) - NGRAM_N + 1)]
    if len(grams) >= NGRAM_MIN_TOTAL and len(set(grams)) / len(grams) <= NGRAM_MAX_DISTINCT:
        return ("repeated_ngrams", f"only {len(set(grams))} distinct of {len(grams)} {NGRAM_N}-word chunks")
    if len(text.encode("utf-8")) >= COMPRESS_MIN_BYTES:
        r = _compress_ratio(text)
        if r < COMPRESS_MAX_RATIO:
            return ("compresses", f"zlib ratio {r:.2f}")
    m = _STUTTER.search(low)
    if m:
        return ("subword_stutter", f"stutter {m.group(0)[:30]!r}")
    m = next((m for m in _UNIT_LOOP.finditer(prose) if len(set(m.group(1))) >= 2), None)
    if m:
        return ("char_loop", f"{m.group(1)!r} repeated {len(m.group(0)) // len(m.group(1))} times")
    runs = sum(len(m.group(0)) for m in _CHAR_RUN.finditer(prose))
    chars = [c for c in _TABLE_RULE.sub(" ", prose).replace("|", " ") if not c.isspace()]
    if runs >= CHAR_RUN_MIN_SHARE * max(1, sum(not c.isspace() for c in prose)):
        return ("char_run", f"{runs} characters are one character repeated")
    if len(chars) >= NOISE_MIN_CHARS:
        letters = sum(c.isalpha() for c in chars) / len(chars)
        symbols = sum(not c.isalnum() for c in chars) / len(chars)
        if letters < NOISE_MAX_LETTERS and (symbols >= NOISE_MIN_SYMBOLS or _compress_ratio(prose) < NOISE_MAX_COMPRESS):
            return ("symbol_noise", f"{letters:.0%} letters, {symbols:.0%} symbols")
    folded = [w.lower() for w in re.findall(r"[A-Za-z]+", _fold_keep_case(prose)) if len(w) >= 2 and not w.isupper()]
    if len(folded) >= SOUP_MIN_WORDS:
        bad = sum(1 for w in folded
                  if w not in _ABBREV and (_NONWORD.search(w) or any(w[i:i + 2] in _BAD_BIGRAMS for i in range(len(w) - 1))))
        common = sum(1 for w in folded if w in _COMMON)
        if bad / len(folded) >= SOUP_MIN_NONWORD and common / len(folded) < SOUP_MAX_COMMON:
            return ("letter_soup", f"{bad} of {len(folded)} words are not word-like, {common} common")
    # No ASCII character is one of them, so the per-character look-up runs only on text that has others.
    junk = 0 if prose.isascii() else sum(1 for c in prose if unicodedata.category(c) in _JUNK_CATEGORIES
                                          or c == "\ufffd" or "\u2580" <= c <= "\u25ff")
    if junk >= JUNK_MIN_CHARS and len(words) >= JUNK_MIN_WORDS and sum(w in _COMMON for w in words) < JUNK_MAX_COMMON * len(words):
        return ("junk_symbols", f"{junk} invisible, private-use or block characters among {len(words)} words")
    allw = _ASCII_WORD.findall(_fold(prose))
    if len(allw) >= SALAD_MIN_WORDS:
        badp = sum(1 for a, b in zip(allw, allw[1:])
                   if (a in _DETERMINERS and b in _AFTER_DET_BAD and not (a == "a" and b in _AFTER_A_OK))
                   or (a == "of" and b in _OF_BAD and b != "the"))
        func = sum(1 for w in allw if w in _FUNCTION) / len(allw)
        if (badp >= SALAD_MIN_BAD_PAIRS and badp / len(allw) >= SALAD_MIN_BAD_FRAC) or (len(allw) >= 15 and func >= SALAD_MAX_FUNCTION):
            return ("word_salad", f"{badp} impossible function-word pairs, {func:.0%} function words")
    return None
