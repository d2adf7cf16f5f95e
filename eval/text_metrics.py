"""Generation metrics against references: corpus BLEU (sacrebleu) and ROUGE-1/2/L F1 (rouge-score)."""
from __future__ import annotations


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's default 13a tokenization, one reference per prediction."""
    import sacrebleu

    _same_length(predictions, references)
    return sacrebleu.corpus_bleu(predictions, [references]).score


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1), with stemming as in the original ROUGE-1.5.5."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: total / max(len(predictions), 1) for kind, total in totals.items()}


def _same_length(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
