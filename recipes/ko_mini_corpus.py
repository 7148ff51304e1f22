"""ko-mini's training text: the corpora read as documents, cleaned and deduplicated (no TensorFlow here).

A document is a string of non-empty lines joined with newlines: an article, a
review, a Bible chapter, a question and its answer, a sentence.
"""

import csv
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

VALID_EVERY = 50  # every 50th document of each source is held out


# --- cleaning: the Wikipedia sample's extractor left brackets whose contents it stripped ---

PARENTHESIS_GROUP = re.compile(r"\(([^()]*)\)")
EDGE_SEPARATORS = re.compile(r"^[\s,;:]+|[\s,;:]+$")
REPEATED_SEPARATORS = re.compile(r"([,;])(?:\s*[,;])+")
EMPTY_BRACKETS = re.compile(r"\s*(?:\(\s*\)|\[\s*\]|《\s*》|〈\s*〉|「\s*」|『\s*』)")
TABLE_MARKUP = ("!", "|", "{|")  # how a wiki table's rows begin
BLANK_LINES = re.compile(r"\n\s*\n")


def tidy_parenthesis(inner):
    """The text inside one pair of parentheses without the separators that stood beside stripped words.

    ", 1924년 10월 1일 ~ " -> "1924년 10월 1일 ~", "白南準, , 1932년" -> "白南準, 1932년", ", , " -> "".
    """
    return EDGE_SEPARATORS.sub("", REPEATED_SEPARATORS.sub(r"\1", inner))


def _tidy_parentheses(line):
    return PARENTHESIS_GROUP.sub(lambda group: f"({tidy_parenthesis(group[1])})", line)


def clean_extractor_fragments(line):
    """A line with its parentheses tidied and the brackets left empty removed, with the space before them."""
    return EMPTY_BRACKETS.sub("", _tidy_parentheses(line))


def extractor_fragments(line):
    """How many bracket groups of a line `clean_extractor_fragments` changes: tidied, or removed as empty."""
    tidied = sum(tidy_parenthesis(group[1]) not in (group[1], "") for group in PARENTHESIS_GROUP.finditer(line))
    return tidied + len(EMPTY_BRACKETS.findall(_tidy_parentheses(line)))


def clean_wikipedia_line(line):
    """A line of an article with its extractor fragments cleaned; "" for a wiki table's markup."""
    return "" if line.startswith(TABLE_MARKUP) else clean_extractor_fragments(line)


# --- deduplication ---


def drop_repeated_lines(documents):
    """Yields the documents without the lines an earlier document (or earlier in the same one) already had.

    Documents left with no line are dropped.
    """
    seen = set()
    for document in documents:
        kept = []
        for line in document.split("\n"):
            if line not in seen:
                seen.add(line)
                kept.append(line)
        if kept:
            yield "\n".join(kept)


def repeated_lines(documents):
    """How many lines repeat an earlier line of the documents (what `drop_repeated_lines` would drop)."""
    seen, repeats = set(), 0
    for document in documents:
        for line in document.split("\n"):
            repeats += line in seen
            seen.add(line)
    return repeats


def line_count(documents):
    return sum(document.count("\n") + 1 for document in documents)


def split_validation(documents):
    """(training, validation): every `VALID_EVERY`th document held out."""
    train = [d for i, d in enumerate(documents) if i % VALID_EVERY != VALID_EVERY - 1]
    valid = [d for i, d in enumerate(documents) if i % VALID_EVERY == VALID_EVERY - 1]
    return train, valid


# --- the corpora ---


def _lines(path, skip_header=False):
    with open(path, encoding="utf-8") as f:
        if skip_header:
            next(f)
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def wikipedia(data):
    """Korean Wikipedia articles: a title line and paragraphs, blank lines between articles."""
    text = (data / "HyundongHwang_PyTorchDeepLearningStart" / "kowiki_sample.txt").read_text(encoding="utf-8")
    return [article.strip("\n") for article in BLANK_LINES.split(text) if article.strip()]


def reviews(data):
    """NSMC movie reviews (the document column), and the movie synopses."""
    for line in _lines(data / "e9t_nsmc" / "ratings_reconstructed.txt", skip_header=True):
        review = line.split("\t")[1].strip()
        if review:
            yield review
    yield from (line.strip() for line in _lines(data / "e9t_nsmc" / "synopses.txt"))


def bible(data):
    """The 1961 Korean Bible, one chapter per document."""
    chapter, verses = None, []
    for line in _lines(data / "bluesaurel_Korean-Bible-1961-KRV" / "bible_krv_1961.tsv"):
        reference, text = line.split("\t", 1)
        this_chapter = reference.split(":")[0]
        if this_chapter != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = this_chapter
        verses.append(text.strip())
    if verses:
        yield "\n".join(verses)


def chatbot(data):
    """Chit-chat question and answer pairs, one pair per document."""
    with open(data / "songys_Chatbot_data" / "ChatbotData.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield f"{row['Q'].strip()}\n{row['A'].strip()}"


def sentences(data):
    """Single sentences: KLUE dev sentences, KorNLI/KorSTS pairs (a sentence per document), news."""
    files = [
        (data / "KLUE-benchmark_KLUE" / "klue_dev_sentences.txt", [0], False),
        (data / "jungyeul_korean-parallel-corpora" / "news_ko.txt", [0], False),
    ]
    files += [(path, [0, 1], True) for path in sorted((data / "kakaobrain_KorNLUDatasets" / "KorNLI").glob("*.tsv"))]
    files += [(path, [5, 6], True) for path in sorted((data / "kakaobrain_KorNLUDatasets" / "KorSTS").glob("*.tsv"))]
    for path, columns, header in files:
        for line in _lines(path, skip_header=header):
            fields = line.split("\t") if len(columns) > 1 else [line]
            for column in columns:
                if column < len(fields) and (text := fields[column].strip()):
                    yield text


@dataclass(frozen=True)
class Source:
    read: Callable  # data folder -> documents
    clean_line: Callable = None  # line -> cleaned line ("" drops it)
    deduplicate: bool = True  # False where repeated lines are part of a document's structure


SOURCES = {
    "wikipedia": Source(wikipedia, clean_wikipedia_line, deduplicate=False),  # its repeats are section headings
    "reviews": Source(reviews),
    "bible": Source(bible, deduplicate=False),  # its repeats are formulae (여호와께서 모세에게 일러 가라사대)
    "chatbot": Source(chatbot),  # answers repeat verbatim
    "sentences": Source(sentences),  # KorNLI repeats its premises
}


def clean_document(document, clean_line):
    """A document with each line cleaned and the lines left blank dropped ("" if none is left)."""
    lines = (clean_line(line) for line in document.split("\n"))
    return "\n".join(line for line in lines if line.strip())


def source_documents(source, data, limit=None):
    """(documents, counts): a source's documents (the first `limit`, if given), cleaned and deduplicated.

    counts: documents and lines as read; for a source that is cleaned, the lines cleaning changed and dropped
    and the extractor fragments it fixed; repeated lines; the lines deduplication dropped; documents and lines kept.
    """
    documents = list(itertools.islice(source.read(data), limit))
    counts = dict(documents_read=len(documents), lines_read=line_count(documents))
    if source.clean_line:
        lines = [line for document in documents for line in document.split("\n")]
        cleaned = list(map(source.clean_line, lines))
        counts.update(
            extractor_fragments=sum(map(extractor_fragments, lines)),
            lines_changed_by_cleaning=sum(after not in (before, "") for before, after in zip(lines, cleaned)),
            lines_dropped_by_cleaning=sum(not after.strip() for after in cleaned),
        )
        documents = [d for d in (clean_document(document, source.clean_line) for document in documents) if d]
    counts["repeated_lines"] = repeated_lines(documents)
    if source.deduplicate:
        documents = list(drop_repeated_lines(documents))
    counts["lines_dropped_by_deduplication"] = counts["repeated_lines"] if source.deduplicate else 0
    counts.update(documents=len(documents), lines=line_count(documents))
    return documents, counts
