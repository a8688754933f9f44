"""Datasets: reading caption files, the vocabulary, the synthetic set, downloads and summaries."""

from capcli.data.readers import load_dataset
from capcli.data.records import CaptionDataset
from capcli.data.text import Vocabulary, build_vocabulary, tokenize

__all__ = ["CaptionDataset", "Vocabulary", "build_vocabulary", "load_dataset", "tokenize"]
