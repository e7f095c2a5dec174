"""The clinician page: a small local web page where the clinic confirms or corrects results (labels)."""
