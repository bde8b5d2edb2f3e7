"""Document hooks for the local upstream tasks (lm-eval `!function` targets); same text as lm-eval's built-in tasks."""

import re


def _clean(text: str) -> str:
    # WikiHow rows of HellaSwag carry " [title]" / "[step]" markers; lm-eval strips them the same way.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """Rowan/hellaswag rows -> query, choices, label (int)."""

    def one(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean(doc["activity_label"] + ": " + context),
            "choices": [_clean(e) for e in doc["endings"]],
            "label": int(doc["label"]),
        }

    return dataset.map(one)


def winogrande_text(doc):
    """Partial scoring: the context differs per choice, so the 'text' is the index of the gold context."""
    return int(doc["answer"]) - 1


def winogrande_target(doc):
    """The shared continuation after the blank."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choice(doc):
    """The two contexts: the sentence up to the blank, filled with each option."""
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]
