"""Simulated users (paper §6.6): a persona reads (prompt, reply) and writes the next user message o, which makes the
model its own teacher (o in hindsight), so o must concern the persona's style and say specifically what was wrong.
Rule personas are deterministic checks (`word_count`, `emoji_count`, ... double as judges); LLM personas give their
profile to an injected user model, so no Ray/vLLM import here. Rule follow-ups vary among 2-3 phrasings by a stable
hash of the reply (blake2b; `hash()` is salted per process): never one constant string, yet reproducible.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import regex  # a transformers dependency; needed for grapheme clusters (\X) and Unicode emoji properties

GENERIC_FOLLOWUP = "Please adjust the style to my preferences."
MAX_FOLLOWUP_CHARS = 300
Messages = list[dict[str, str]]
GenerateFn = Callable[[list[Messages], int, float], Sequence[str]]


@dataclass(frozen=True)
class Persona:
    """A simulated user: `description` is the LLM user model's profile; `rule` (prompt, reply) -> follow-up."""
    name: str
    description: str
    rule: Callable[[str, str], str] | None = None


def word_count(text: str) -> int:
    """Whitespace tokens holding a letter or digit: bullets, dashes and emoji are not words; "don't" is one."""
    return sum(1 for tok in text.split() if any(ch.isalnum() for ch in tok))


_PRESENTATION = regex.compile(r"\p{Emoji_Presentation}")
_PICTOGRAPH = regex.compile(r"\p{Extended_Pictographic}")


def _is_emoji_cluster(cluster: str) -> bool:
    """Shown as an emoji: a keycap, a pictograph + VS16, an emoji-presentation char, or a supplementary-plane
    pictograph. Not: text-default symbols (© ™ ↔) without VS16, or anything forced to text style by VS15."""
    if "\u20e3" in cluster or ("\ufe0f" in cluster and _PICTOGRAPH.search(cluster)):
        return True
    if "\ufe0e" in cluster:
        return False
    return any(_PRESENTATION.match(ch) or (ord(ch) >= 0x1F000 and _PICTOGRAPH.match(ch)) for ch in cluster)


def emoji_count(text: str) -> int:
    """Emoji as a reader sees them: a ZWJ family, a flag, a skin-toned thumb or a keycap each count once."""
    return sum(1 for cluster in regex.findall(r"\X", text) if _is_emoji_cluster(cluster))


def uppercase_ratio(text: str) -> float:
    """Share of cased letters that are upper case (0.0 when there are none), so digits and punctuation are neutral."""
    upper, lower = sum(ch.isupper() for ch in text), sum(ch.islower() for ch in text)
    return upper / (upper + lower) if upper + lower else 0.0


_MARKDOWN = {"bullet points": re.compile(r"^[ \t]*[-*+•][ \t]+\S", re.MULTILINE),
             "numbered lists": re.compile(r"^[ \t]*\d{1,3}[.)][ \t]+\S", re.MULTILINE),
             "headers": re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+\S", re.MULTILINE),
             "bold text": re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")}


def has_markdown_list(text: str) -> bool:
    """A line starting with a bullet (-, *, +, •) or a number and '.'/')' followed by text."""
    return any(_MARKDOWN[kind].search(text) for kind in ("bullet points", "numbered lists"))


def markdown_features(text: str) -> list[str]:
    """Names of the markdown formatting found, in a fixed order, so a complaint can say exactly what to drop."""
    return [name for name, pattern in _MARKDOWN.items() if pattern.search(text)]


_APOS = "['\u2019]"
_CONTRACTION = re.compile(
    rf"\b(?:\w+n{_APOS}t|\w+{_APOS}(?:re|ve|ll|m|d)|(?:it|that|there|here|what|who|where|when|why|how|let|he|she)"
    rf"{_APOS}s|y{_APOS}all)\b", re.IGNORECASE)


def find_contractions(text: str) -> list[str]:
    """Contractions such as don't, we're, it's; possessives like "John's" are not contractions and are skipped."""
    return _CONTRACTION.findall(text)


def find_words(text: str, words: Sequence[str]) -> list[str]:
    """The listed words/phrases present (whole words, case-insensitive, as written in `text`), in text order."""
    hits = (re.search(r"(?<!\w)" + re.escape(w).replace("'", _APOS) + r"(?!\w)", text, re.IGNORECASE) for w in words)
    return [hit.group() for hit in sorted((hit for hit in hits if hit), key=lambda hit: hit.start())]


CASUAL_WORDS = ("hey", "hi there", "awesome", "gonna", "wanna", "gotta", "kinda", "sorta", "yeah", "yep", "nope",
                "lol", "btw", "dude", "guys", "folks", "totally", "stuff")
STIFF_WORDS = ("furthermore", "moreover", "therefore", "hence", "thus", "additionally", "consequently",
               "nevertheless", "in conclusion", "it is important to note", "utilize", "regarding", "whereby")
FILLER_PHRASES = ("great question", "good question", "excellent question", "what a great", "you're absolutely right",
                  "you are absolutely right", "hope this helps", "happy to help", "i'd be happy to", "feel free to",
                  "let me know if")
FILLER_OPENER = re.compile(rf"^[\s*#>_]*(?:(?:great|good|excellent|interesting) question|what an? (?:great|good|interesting)"
                     rf"|that{_APOS}s an? (?:great|good|interesting)|(?:sure|certainly|of course|absolutely|ok|okay)"
                     rf"\s*[,!.:]|i{_APOS}d be (?:happy|glad)|i{_APOS}m (?:happy|glad)|happy to help)", re.IGNORECASE)
_PIRATE = re.compile(r"\b(?:ar{2,}g*h*|argh+|ahoy|mateys?|ye|aye|avast|landlubbers?|scallywags?|hearties|booty|grog"
                     r"|shiver me timbers|yo[- ]ho(?:[- ]ho)?|plunder|sea ?dogs?|buccaneers?|doubloons?)\b",
                     re.IGNORECASE)


def pirate_term_count(text: str) -> int:
    """Occurrences of unmistakable pirate vocabulary (arr, matey, ye, aye, ahoy, ...)."""
    return len(_PIRATE.findall(text))


_SAY: dict[str, tuple[str, ...]] = {  # phrasings per situation; {fields} are filled from the reply
    "empty": ("You didn't say anything. Please answer my question.", "That was empty. Give me an actual answer."),
    "concise_far": ("Way too long. I just want one or two short sentences, please.",
                    "That's far more than I asked for ({n} words). Keep it to a couple of short sentences.",
                    "Too wordy. Give me the short version, two sentences at most."),
    "concise_near": ("A bit long. Could you trim it to one or two sentences?",
                     "Still slightly too long for me. Shorter, please, just the main point.",
                     "Almost, but please cut it down; I only need the gist in a sentence or two."),
    "concise_ok": ("Thanks, that was the right length.", "Perfect, short and to the point.", "Great, nicely brief."),
    "detailed_far": ("That's barely anything. I wanted a thorough explanation with details and examples.",
                     "Much too short. Please explain it properly, step by step, with examples.",
                     "Only {n} words? I need a detailed, in-depth answer."),
    "detailed_near": ("A bit thin. Please go deeper, with more detail and an example or two.",
                      "Could you expand on that? I'd like more depth and context.",
                      "Not detailed enough for me. Add more explanation and concrete examples."),
    "detailed_ok": ("Thanks, that's the level of detail I wanted.", "Great, nice and thorough.", "Perfect, in depth."),
    "no_emojis": ("Please don't use emojis; you put {n} in there. Plain text only.",
                  "No emojis, please. I find them distracting.",
                  "Drop the emojis ({n} of them), they don't belong in an answer."),
    "no_emojis_ok": ("Thanks, clean text without emojis, just how I like it.", "Good, no emojis. That works for me."),
    "formal": ("Please keep it formal: no {what}.", "That is too casual for me. Please avoid {what}.",
               "I expect a professional tone, so please write without {what}."),
    "formal_ok": ("Thank you, the tone was appropriately formal.", "Good, that is the professional tone I expect."),
    "casual_words": ("Way too stiff. Nobody talks like {what}, just chat with me normally.",
                     "This reads like a textbook ({what}?). Loosen up and talk like a friend would."),
    "casual_tone": ("You sound like a textbook. Relax, talk to me like a friend would, contractions and all.",
                    "Kinda stiff. Could you say it the way you'd say it to a buddy?"),
    "casual_ok": ("Nice, that's the relaxed vibe I like.", "Cool, thanks, that felt like a real chat."),
    "no_lists": ("Please don't use {what}. Just write it as a normal paragraph.",
                 "No {what}, please. I want plain prose.", "Can you drop the {what}? Flowing sentences only."),
    "no_lists_ok": ("Thanks, plain prose is exactly what I wanted.", "Good, no lists or formatting. Easier to read."),
    "answer_directly": ("Please just answer directly: {what}.", "Too much around the answer. Next time {what}.",
                        "Get to the point, please: {what}."),
    "answer_directly_ok": ("Thanks, straight to the point.", "Good, that's the direct answer I wanted."),
    "no_filler": ("Please drop the filler like {what}; just give me the substance.",
                  "Skip the pleasantries ({what}). I only want the content.", "No need for {what}. Just the facts."),
    "no_filler_ok": ("Thanks, no fluff. That's what I like.", "Good, all substance and no filler."),
    "pirate": ("Arr, ye forgot to talk like a pirate! Pirate speak, matey, every time.",
               "Where be the pirate talk? Answer me like a proper buccaneer, with arr and matey.",
               "That be plain landlubber English. Talk like a pirate, ye scallywag!"),
    "pirate_ok": ("Arr, that be the way I like it, matey!", "Aye, fine pirate talk. Thank ye!"),
    "all_caps": ("PLEASE WRITE YOUR WHOLE ANSWER IN CAPITAL LETTERS.",
                 "WHY IS THIS IN LOWERCASE? I NEED EVERYTHING IN CAPITAL LETTERS.",
                 "ALL CAPS, PLEASE. ONLY {pct}% OF THAT WAS UPPERCASE."),
    "all_caps_ok": ("THANKS, ALL CAPS, JUST HOW I LIKE IT.", "PERFECT, EVERYTHING IN CAPITALS."),
}


def _say(key: str, reply: str, **fields: object) -> str:
    """One phrasing of `key`, chosen by a stable hash of the reply (same reply -> same message in every process)."""
    options = _SAY[key]
    digest = hashlib.blake2b(reply.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return options[int.from_bytes(digest, "big") % len(options)].format(**fields)


def _join(items: Sequence[str], last: str = "and") -> str:
    """'a', 'a and b', 'a, b and c': items listed the way a person writes them."""
    return "".join(items) if len(items) < 2 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def _quoted(items: Sequence[str], limit: int = 2) -> str:
    """'"a" and "b"': the first offending items (case-insensitively unique), quoted back the way a user would."""
    unique = [item for n, item in enumerate(items) if item.lower() not in {i.lower() for i in items[:n]}]
    return _join([f'"{item}"' for item in unique[:limit]])


def _guarded(rule: Callable[..., str], prompt: str, reply: str, **params: object) -> str:
    """Every persona answers an empty reply the same sensible way instead of praising it (e.g. as 'short')."""
    return _say("empty", reply) if not reply.strip() else rule(prompt, reply, **params)


def _concise(prompt: str, reply: str, *, max_words: int) -> str:
    """Two tiers, so the follow-up says how far over the limit the reply was."""
    n = word_count(reply)
    return _say("concise_far" if n > 2 * max_words else "concise_near" if n > max_words else "concise_ok", reply, n=n)


def _detailed(prompt: str, reply: str, *, min_words: int) -> str:
    """Two tiers (under a third of the minimum, or just under it), mirroring `_concise`."""
    n = word_count(reply)
    return _say("detailed_far" if n < min_words // 3 else "detailed_near" if n < min_words else "detailed_ok",
                reply, n=n)


def _no_emojis(prompt: str, reply: str) -> str:
    """Counts grapheme clusters, so one family or flag emoji is one complaint item, not five code points."""
    n = emoji_count(reply)
    return _say("no_emojis" if n else "no_emojis_ok", reply, n=n)


def _formal(prompt: str, reply: str) -> str:
    """Names each kind of informality found (quoting the first offenders), as a particular user would."""
    issues = []
    if contractions := find_contractions(reply):
        issues.append(f"contractions like {_quoted(contractions)}")
    if "!" in reply:
        issues.append("exclamation marks")
    if casual := find_words(reply, CASUAL_WORDS):
        issues.append(f"casual words like {_quoted(casual)}")
    return _say("formal" if issues else "formal_ok", reply, what=_join(issues))


def _casual(prompt: str, reply: str, *, min_words: int) -> str:
    """Stiff connectives always; otherwise a longer reply with no contraction at all reads as stiff."""
    if stiff := find_words(reply, STIFF_WORDS):
        return _say("casual_words", reply, what=_quoted(stiff))
    stiff_tone = word_count(reply) >= min_words and not find_contractions(reply)
    return _say("casual_tone" if stiff_tone else "casual_ok", reply)


def _no_lists(prompt: str, reply: str) -> str:
    found = markdown_features(reply)
    return _say("no_lists" if found else "no_lists_ok", reply, what=_join(found, "or"))


def _answer_directly(prompt: str, reply: str) -> str:
    """A filler opener ("Great question!", "Sure,") and markdown formatting are the two things this user hates."""
    issues = ["skip the intro and start with the answer"] if FILLER_OPENER.match(reply) else []
    if found := markdown_features(reply):
        issues.append(f"no {_join(found, 'or')}")
    return _say("answer_directly" if issues else "answer_directly_ok", reply, what="; ".join(issues))


def _no_filler(prompt: str, reply: str) -> str:
    found = find_words(reply, FILLER_PHRASES)
    return _say("no_filler" if found else "no_filler_ok", reply, what=_quoted(found))


def _pirate(prompt: str, reply: str, *, min_terms: int) -> str:
    """Needs `min_terms` pirate words, so a single stray "aye" is not pirate speak."""
    return _say("pirate" if pirate_term_count(reply) < min_terms else "pirate_ok", reply)


def _all_caps(prompt: str, reply: str, *, min_ratio: float) -> str:
    """A ratio threshold, so an acronym or a lower-case URL does not decide the verdict."""
    ratio = uppercase_ratio(reply)
    return _say("all_caps" if ratio < min_ratio else "all_caps_ok", reply, pct=round(100 * ratio))


# name -> (profile text, formatted with the parameters; rule or None for LLM-only; parameter defaults)
_SPECS: dict[str, tuple[str, Callable[..., str] | None, dict[str, float]]] = {
    "concise": (("I want short answers: at most about {max_words} words, one or two sentences, no preamble and no "
                "extra detail unless I ask for it."), _concise, {"max_words": 40}),
    "detailed": (("I want thorough answers of at least {min_words} words that explain the reasoning and give context "
                 "and concrete examples."), _detailed, {"min_words": 150}),
    "no_emojis": ("I dislike emojis and never want to see any in an answer.", _no_emojis, {}),
    "formal": (("I expect a formal, professional tone: no contractions, no exclamation marks, no slang or casual "
               "words."), _formal, {}),
    "casual": (("I like a relaxed, friendly, conversational tone, the way a friend talks; stiff or academic wording "
               "puts me off."), _casual, {"min_words": 30}),
    "no_lists": ("I want plain prose: no bullet points, numbered lists, headers or bold text.", _no_lists, {}),
    "answer_directly": (("I want the answer right away, without an intro such as 'Great question' or 'Sure!', and "
                        "without markdown formatting like lists, headers or bold text."), _answer_directly, {}),
    "no_filler": (("I can't stand filler, praise or flattery such as 'Great question!' or 'I hope this helps'; give "
                  "me only the substance."), _no_filler, {}),
    "pirate": ("I want every answer in pirate speak, with words like arr, matey and aye.", _pirate, {"min_terms": 2}),
    "all_caps": ("I want every answer written entirely in capital letters.", _all_caps, {"min_ratio": 0.9}),
}
# The paper's 2x2x2 style profiles (LLM users only: tone and expertise are not rule-checkable).
_LENGTH = {"concise": "I prefer short, to-the-point answers.", "detailed": "I prefer thorough, detailed answers."}
_TONE = {"casual": "Talk to me in a relaxed, conversational way.", "professional": "Use a polished, professional tone."}
_LEVEL = {"beginner": "I'm a beginner: explain simply, no jargon.", "expert": "I'm an expert: skip basics, be precise."}
_SPECS.update({f"{l}_{t}_{v}": (f"{_LENGTH[l]} {_TONE[t]} {_LEVEL[v]}", None, {})
               for l in _LENGTH for t in _TONE for v in _LEVEL})


def make_persona(name: str, **params: float) -> Persona:
    """A persona by name with its parameters (e.g. concise max_words). The rule is a partial of module-level
    functions, so a Persona pickles and can travel to a Ray worker. Errors list what is known/accepted."""
    if name.startswith("prefeval:") and not params:  # a PrefEval stated preference (LLM users and judges only)
        from rayuid.feedback.prefeval import profile
        return Persona(name, profile(name))
    if name not in _SPECS:
        raise ValueError(f"unknown persona {name!r}; known personas: {', '.join(sorted(_SPECS))}")
    template, fn, defaults = _SPECS[name]
    if unknown := sorted(set(params) - set(defaults)):
        raise ValueError(f"persona {name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(defaults) or 'none'}")
    values = {**defaults, **params}
    if bad := [f"{k}={v}" for k, v in values.items() if not 0 < v or (k.endswith("ratio") and v > 1)]:
        raise ValueError(f"persona {name!r}: out of range {', '.join(bad)} (must be > 0; ratios <= 1)")
    rule = partial(_guarded, fn, **values) if fn else None
    return Persona(name, template.format(**values), rule)


PERSONAS: dict[str, Persona] = {name: make_persona(name) for name in _SPECS}


_SYSTEM = """You are playing a user who is chatting with an AI assistant. This is your USER PROFILE:
{profile}

You will see the request you sent and the assistant's response. Write your next message to the assistant.
- Judge only the assistant's response, and only with respect to your USER PROFILE (style, tone, format, length).
- Do not answer or continue the original request yourself.
- Be very brief: one or two short sentences.
- Give no feedback that is unrelated to your profile.
- Output only the text of your message: no quotes, labels or explanations.
- If the response already fits your profile well, you may just say so briefly."""

_USER = "Original user request:\n{prompt}\n\nAssistant response:\n{reply}\n\nWrite the user's next message."


def user_model_messages(persona: Persona, prompt: str, reply: str) -> Messages:
    """Chat messages (OpenAI format) asking an LLM to write the persona's follow-up, per the paper's prompt."""
    return [{"role": "system", "content": _SYSTEM.format(profile=persona.description)},
            {"role": "user", "content": _USER.format(prompt=prompt, reply=reply)}]


_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
_PREFIX = re.compile(r"^[\s*_#>]*(?:the\s+)?(?:user(?:'s)?(?:\s+next)?(?:\s+message)?|next\s+(?:user\s+)?message"
                     r"|message|follow[- ]?up)\s*[*_]*\s*:\s*[*_]*\s*", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}


def _truncate(text: str, max_chars: int) -> str:
    """Cut at the last sentence end in the second half of the budget, else at the last word boundary."""
    head = text[:max_chars]
    end, space = max(head.rfind(mark) for mark in ".!?"), head.rfind(" ")
    return head[: end + 1] if end >= max_chars // 2 else (head[:space] if space > 0 else head).rstrip()


def clean_followup(text: str | None, fallback: str = GENERIC_FOLLOWUP, max_chars: int = MAX_FOLLOWUP_CHARS) -> str:
    """The bare message from an LLM user model's output: no <think> block, role label, wrapping quotes or extra
    whitespace, at most `max_chars`. Empty -> `fallback` (pass fallback="" to detect and count fallbacks)."""
    text = " ".join(_THINK.sub(" ", text or "").split())
    for _ in range(3):  # labels and quotes nest: User: "..." or "User: ..."; a no-op once clean
        text = _PREFIX.sub("", text).strip()
        if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and (text[0] != '"' or '"' not in text[1:-1]):
            text = text[1:-1].strip()
    text = _truncate(text, max_chars) if len(text) > max_chars else text
    return text if text.strip(" \"'`*_.-") else fallback


def _check_batch(prompts: Sequence[str], replies: Sequence[str]) -> None:
    if len(prompts) != len(replies):
        raise ValueError(f"need one reply per prompt (got {len(prompts)} prompts and {len(replies)} replies)")


class RuleUserSimulator:
    """Deterministic follow-ups from a persona's rule: reproducible runs and tests without a second model."""

    def __init__(self, persona: Persona) -> None:
        if persona.rule is None:
            raise ValueError(f"persona {persona.name!r} has no rule; use kind=\"llm\" with a user model")
        self.persona = persona

    def respond(self, prompts: Sequence[str], replies: Sequence[str]) -> list[str]:
        _check_batch(prompts, replies)
        return [self.persona.rule(p, r) for p, r in zip(prompts, replies)]


class LLMUserSimulator:
    """The paper's LLM user model: one batched `generate_fn` call per step, outputs cleaned, fallbacks counted."""

    def __init__(self, persona: Persona, generate_fn: GenerateFn, max_tokens: int = 96, temperature: float = 0.0,
                 max_chars: int = MAX_FOLLOWUP_CHARS) -> None:
        self.persona, self.generate_fn = persona, generate_fn
        self.max_tokens, self.temperature, self.max_chars = max_tokens, temperature, max_chars
        self.fallbacks = self.calls = 0

    def respond(self, prompts: Sequence[str], replies: Sequence[str]) -> list[str]:
        _check_batch(prompts, replies)
        if not prompts:
            return []
        batch = [user_model_messages(self.persona, p, r) for p, r in zip(prompts, replies)]
        raw = list(self.generate_fn(batch, self.max_tokens, self.temperature))
        self.calls += 1
        if len(raw) != len(batch):
            raise RuntimeError(f"user model returned {len(raw)} outputs for {len(batch)} conversations")
        cleaned = [clean_followup(text, fallback="", max_chars=self.max_chars) for text in raw]
        self.fallbacks += cleaned.count("")
        return [text or GENERIC_FOLLOWUP for text in cleaned]


def make_simulator(kind: str, persona_name: str, generate_fn: GenerateFn | None = None, *, max_tokens: int = 96,
                   temperature: float = 0.0, **params: object) -> RuleUserSimulator | LLMUserSimulator:
    """A simulator from config values; `params` go to the persona, max_tokens/temperature to the LLM user only."""
    if kind not in ("rule", "llm"):
        raise ValueError(f"unknown user simulator kind {kind!r}; use \"rule\" or \"llm\"")
    persona = make_persona(persona_name, **params)
    if kind == "rule":
        return RuleUserSimulator(persona)
    if generate_fn is None:
        raise ValueError("kind=\"llm\" needs a generate_fn (a chat engine for the user model)")
    return LLMUserSimulator(persona, generate_fn, max_tokens=max_tokens, temperature=temperature)
