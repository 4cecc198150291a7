"""The interface every VLM judge backend implements (local transformers, OpenAI-compatible servers).

A backend answers a batch of :class:`JudgeRequest` objects. Each request carries the images in the order
the prompt refers to them (e.g. ``[reference normal image, the sample, crop 1, crop 2, crop 3]``), a
system text and a user text that asks for an answer starting with "Yes" or "No". The backend returns the
generated text and, from the probabilities of the FIRST generated token (local: logits; servers:
``logprobs``/``top_logprobs``), P(yes) = sigmoid(log p(yes-spellings) - log p(no-spellings)) and the
probability mass on those spellings (how much the model really answered yes/no).

Example:
    >>> answers = backend.judge([JudgeRequest(images=[img], system="You inspect parts.",
    ...                                       user="Is there a defect? Answer Yes or No, then explain.")])
    >>> answers[0].p_yes, answers[0].answered_mass, answers[0].text
    (0.93, 0.98, 'Yes. Defect: scratch. Location: top left. ...')
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

#: spellings of the two answers, compared after normalisation (strip Ġ/▁, spaces, punctuation, lowercase)
YES_WORDS = ("yes",)
NO_WORDS = ("no",)


@dataclass
class JudgeRequest:
    """One question to the VLM.

    Attributes:
        images: images in the order the text refers to them.
        user: the user text (the question, product knowledge, expert verdict in words...).
        system: the system text (shared across requests: put it first so servers can cache the prefix).
        max_new_tokens: generation budget for the explanation.
        meta: free data carried back unchanged (e.g. the sample id).
        options: option letters of a multiple-choice question (``("A", "B", "C")``): the answer then also
            carries the first token's probabilities over them (:attr:`JudgeAnswer.option_probs`); empty for
            a yes/no question.
    """

    images: list[Image.Image]
    user: str
    system: str = ""
    max_new_tokens: int = 96
    meta: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()


@dataclass
class JudgeAnswer:
    """A backend's answer to one :class:`JudgeRequest`.

    Attributes:
        text: the generated text (answer only, never the prompt).
        p_yes: P(yes) from the first generated token's probabilities (None if unavailable).
        answered_mass: probability mass on the yes/no spellings at that token (None if unavailable).
        server: which server answered (the OpenAI-compatible backend: its base URL without credentials);
            None for a local model.
        error: a short message when this request failed (the run goes on), else None. With ``text`` set
            too, the answer arrived but cannot be used as it is (e.g. malformed log-probabilities,
            :class:`MalformedAnswer`): the text is kept and the sample is recorded as "unparsed".
        meta: the request's ``meta``.
        option_probs: for a request with ``options``: letter -> probability of the first generated token
            being that letter, normalised over the options (None when no option letter could be read: a
            server without logprobs, or no letter among its top candidates).
        option_mass: the first token's probability mass on the option letters (before normalising).
    """

    text: str = ""
    p_yes: float | None = None
    answered_mass: float | None = None
    server: str | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    option_probs: dict[str, float] | None = None
    option_mass: float | None = None


def normalize_token(token: str) -> str:
    """Token text -> comparable word: strip byte-level/sentencepiece markers, spaces, punctuation, case."""
    token = token.replace("Ġ", " ").replace("▁", " ")
    return re.sub(r"[\W_]+", "", token).lower()


class MalformedAnswer(ValueError):
    """A server's answer whose first-token log-probabilities cannot be true (above 0, NaN, +inf, yes/no mass
    above 1, or the sampled yes/no token without its own log-probability): P(yes) cannot be read from it."""


#: how far above 0 a log-probability may lie (float rounding on the server) before it is malformed
LOGPROB_TOLERANCE = 1e-4


def check_logprob(token: str, lp: Any) -> float:
    """``lp`` as a float, checked: a log-probability is at most 0 (:data:`LOGPROB_TOLERANCE` allowed; -inf
    is a probability of 0).

    Raises:
        MalformedAnswer: not a number, NaN, +inf or above 0.
    """
    try:
        value = float(lp)
    except (TypeError, ValueError):
        raise MalformedAnswer(f"log-probability of {token!r} is not a number ({lp!r})") from None
    if math.isnan(value) or value > LOGPROB_TOLERANCE:
        raise MalformedAnswer(f"log-probability of {token!r} is {lp!r}, not a log-probability (<= 0)")
    return min(value, 0.0)


def p_yes_from_logprobs(logprobs: Mapping[str, float] | Iterable[tuple[str, float]]) -> tuple[float | None, float]:
    """P(yes) and the answered mass from one position's token log-probabilities.

    Args:
        logprobs: token text -> log-probability (e.g. a server's ``top_logprobs``, or the top-k of local
            logits decoded to text). Tokens that normalise to the same word are summed.

    Returns:
        ``(p_yes, mass)``: ``p_yes = sigmoid(log P(yes) - log P(no))`` over every spelling, None when
        neither word appears; ``mass = P(yes) + P(no)``.

    Raises:
        MalformedAnswer: a yes/no log-probability that is not one (:func:`check_logprob`), or a yes/no
            mass above 1 (never a true distribution): the caller keeps the text and reports the answer.
    """
    items = logprobs.items() if isinstance(logprobs, Mapping) else logprobs
    p_y = p_n = 0.0
    for token, lp in items:
        word = normalize_token(token)
        if word in YES_WORDS:
            p_y += math.exp(check_logprob(token, lp))
        elif word in NO_WORDS:
            p_n += math.exp(check_logprob(token, lp))
    if p_y + p_n > 1.0 + 1e-3:
        raise MalformedAnswer(f"the yes/no log-probabilities sum to a probability of {p_y + p_n:.4g} (> 1)")
    if p_y == 0.0 and p_n == 0.0:
        return None, 0.0
    if p_n == 0.0:
        return 1.0, p_y
    if p_y == 0.0:
        return 0.0, p_n
    return 1.0 / (1.0 + math.exp(math.log(p_n) - math.log(p_y))), p_y + p_n


def option_letter(token: str) -> str | None:
    """The option letter a token spells, or None: ``"A"``, ``" A"``, ``"ĠA"``, ``"▁A"``, ``"A."``, ``"(A"``,
    ``"A)"`` -> ``"A"``; case matters (``"a"`` is the English article, not an option) and ``"AB"`` or
    ``"Answer"`` spell none."""
    core = token.replace("Ġ", " ").replace("▁", " ").strip().strip("().:,*[]")
    return core if len(core) == 1 and "A" <= core <= "Z" else None


def option_probs_from_logprobs(logprobs: Mapping[str, float] | Iterable[tuple[str, float]],
                               letters: Iterable[str]) -> tuple[dict[str, float] | None, float]:
    """Probabilities of the option ``letters`` from one position's token log-probabilities.

    Args:
        logprobs: token text -> log-probability (a server's ``top_logprobs``); tokens spelling the same
            letter (:func:`option_letter`) are summed.
        letters: the options' letters.

    Returns:
        ``(probs, mass)``: ``probs`` letter -> probability normalised over the letters (a letter missing from
        ``logprobs`` gets 0), None when no letter appears; ``mass`` the summed probability of the letters.
    """
    wanted = list(letters)
    sums = dict.fromkeys(wanted, 0.0)
    items = logprobs.items() if isinstance(logprobs, Mapping) else logprobs
    for token, lp in items:
        letter = option_letter(str(token))
        if letter in sums and lp is not None and math.isfinite(float(lp)):
            sums[letter] += math.exp(float(lp))
    mass = sum(sums.values())
    if mass <= 0.0:
        return None, 0.0
    return {k: v / mass for k, v in sums.items()}, min(1.0, mass)


class BackendUnavailable(RuntimeError):
    """A judge backend cannot answer at all (server unreachable, key refused): found by :meth:`JudgeBackend.check`."""


class JudgeBackend(ABC):
    """A VLM that answers batches of :class:`JudgeRequest` objects.

    Implementations batch (local) or keep several requests in flight (servers), never one blocking call
    per image; a failed request yields a :class:`JudgeAnswer` with ``error`` set instead of raising.
    """

    #: short name recorded on the run ("transformers", "openai")
    name: str = "base"
    #: requests the backend works on at once (a server backend: its window over all servers); the judge
    #: prepares enough batches ahead (:meth:`prepare` sends them) to keep that many busy
    max_in_flight: int = 1

    @abstractmethod
    def judge(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """Answer every request, in order."""

    def check(self) -> None:
        """Fail fast, before a run is recorded, when this backend cannot answer at all.

        Cheap (at most one request, no retries). The default does nothing: a local model is loaded when the
        backend is built, so an unusable one has failed already.

        Raises:
            BackendUnavailable: one clear message (naming the server, never a secret).
        """

    def prepare(self, requests: list[JudgeRequest]) -> Any:
        """CPU work on a batch that may run in another thread while :meth:`judge_prepared` runs the previous one.

        The default does nothing (returns the requests); local backends resize images and run their processor
        here. ``judge_prepared(prepare(requests))`` answers the same as ``judge(requests)``.
        """
        return list(requests)

    def judge_prepared(self, prepared: Any) -> list[JudgeAnswer]:
        """Answer a batch returned by :meth:`prepare`, in order (the default: :meth:`judge`)."""
        return self.judge(prepared)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description for the run config (model id, revision...; never secrets)."""
        return {"backend": self.name}

    def spec(self) -> dict[str, Any]:
        """``make_backend``'s arguments (``name`` included) that build this backend again in another process,
        e.g. the delegated workers of ``judge(..., shards=N)``: JSON-serialisable, never a secret.

        Raises:
            ValueError: this backend cannot be rebuilt from arguments (one built in code, or one holding a
                secret that would have to be stored).
        """
        raise ValueError(f"a {type(self).__name__} cannot be rebuilt by a worker: pass make_backend's arguments "
                         "as a dict instead, e.g. backend={'name': 'openai', 'base_url': ..., 'model': ...}")
