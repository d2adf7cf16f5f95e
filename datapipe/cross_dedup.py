"""Dedup across named sources: which copy is kept, and which source each removed duplicate matched.

Rule: of a group of duplicates, the first copy in (source priority, file, row) order is kept: the
one from the source listed first in `sources:`, and within it the first. The source reader makes
(task rank, position in the task) that same order for any task count (datapipe/sources.py), so:
- exact_dedup: datatrove's `document_priority` (higher wins, ties go to the lower position) is
  65535 - task rank;
- minhash_dedup: a cluster keeps its lowest (task rank, position).

The overlap matrix of a step (`overlap.json` in its work folder) counts, for each source A and B,
how many of A's removed documents were duplicates of the copy kept from B (A == B: within A).
"""
from __future__ import annotations

import heapq
import itertools
import json
import struct
from bisect import bisect_right
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import read_sigs
from datatrove.pipeline.dedup.minhash import MinhashDedupCluster
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.typeshelper import ExtensionHelperSD

from datapipe.readers import SOURCE_KEY

OVERLAP_FILE = "overlap.json"
# Set by SourceMap on the document about to be signed: its task rank, for source_priority.
RANK_KEY = "_rank"
MAX_PRIORITY = 65535  # datatrove stores the priority as 16 bits


def empty_matrix(names: list[str]) -> dict[str, dict[str, int]]:
    return {a: {b: 0 for b in names} for a in names}


def write_json(path: str, payload) -> None:
    # a find stage re-run after a crash rewrites the file whole; readers never see half of it
    tmp = Path(f"{path}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.rename(path)


def source_priority(doc: Document) -> int:
    """datatrove's `document_priority` for exact dedup: earlier tasks first (positions break ties)."""
    return MAX_PRIORITY - doc.metadata[RANK_KEY]


class ExactOverlap(PipelineStep):
    """After datatrove's exact find: streams the sorted signature files once more, grouped by hash.

    The kept copy of a group is its highest-priority member, i.e. from its first-listed source, so
    every other member counts as (own source, kept copy's source). Streaming, like the find step.
    """

    type = "🫂 - DEDUPS"
    name = "🔀 cross-source overlap (exact)"

    def __init__(self, sig_folder: str, source_maps: str, overlap_path: str, names: list[str],
                 hash_config: HashConfig):
        super().__init__()
        self.sig_folder = get_datafolder(sig_folder)
        self.source_maps, self.overlap_path, self.names = source_maps, overlap_path, names
        self.hash_config = hash_config

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        maps = load_source_maps(self.source_maps)

        def source(sig) -> str:
            return source_at(maps, MAX_PRIORITY - sig.priority, sig.doc_id)

        matrix = empty_matrix(self.names)
        files = self.sig_folder.list_files(glob_pattern="*/*" + ExtensionHelperSD.stage_1_signature)
        streams = [read_sigs(f, i, self.hash_config) for i, f in enumerate(self.sig_folder.open_files(files))]
        # the signature files are sorted as datatrove's find step reads them, so a group's first is the kept one
        for _, group in itertools.groupby(heapq.merge(*streams), key=lambda sig: sig.hash_value):
            kept, *removed_copies = group
            for removed in removed_copies:
                matrix[source(removed)][source(kept)] += 1
                self.stat_update("duplicates")
        write_json(self.overlap_path, matrix)


class SourceMap(PipelineStep):
    """Records which source each position of a task's stream holds, as runs: [[source, count], ...].

    Placed right before a dedup signature block, so (task, position) there maps back to a source;
    also tags each document with its task rank for `source_priority` (after the stage writer, so the
    tag is never stored).
    """

    type = "🔀 - SOURCES"
    name = "🗺️ source map"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = get_datafolder(folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        runs: list[list] = []
        if rank >= MAX_PRIORITY:
            raise ValueError(f"dedup across sources: at most {MAX_PRIORITY} tasks (datatrove's 16-bit priority)")
        for doc in data:
            doc.metadata[RANK_KEY] = rank
            source = doc.metadata[SOURCE_KEY]
            if runs and runs[-1][0] == source:
                runs[-1][1] += 1
            else:
                runs.append([source, 1])
            yield doc
        with self.folder.open(f"{rank:05d}.json", "wt") as f:
            json.dump(runs, f)


def load_source_maps(folder: str) -> dict[int, tuple[list[int], list[str]]]:
    """rank -> (run end positions, run sources), for `source_at`."""
    maps = {}
    for path in sorted(Path(folder).glob("*.json")):
        ends, sources, total = [], [], 0
        for source, count in json.loads(path.read_text()):
            total += count
            ends.append(total)
            sources.append(source)
        maps[int(path.stem)] = (ends, sources)
    return maps


def source_at(maps: dict[int, tuple[list[int], list[str]]], rank: int, position: int) -> str:
    ends, sources = maps[rank]
    return sources[bisect_right(ends, position)]


class OrderedMinhashCluster(MinhashDedupCluster):
    """datatrove's MinHash clustering with the cluster's first document (in (task, position) order) kept.

    datatrove unions by size, so which document of a cluster of three or more survives depends on the
    order the pairs arrive in; across sources the kept copy must follow the priority rule instead.
    Reads datatrove's `.dups` pairs and writes its `.remove` files, plus the overlap matrix.
    """

    name = "🎯 MinHash stage 3 (source order)"

    def __init__(self, input_folder: str, output_folder: str, config, source_maps: str, overlap_path: str,
                 names: list[str]):
        super().__init__(input_folder, output_folder, config=config)
        self.source_maps, self.overlap_path, self.names = source_maps, overlap_path, names

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def find(x):
            root = x
            while parent.setdefault(root, root) != root:
                root = parent[root]
            while parent[x] != root:  # path compression
                parent[x], x = root, parent[x]
            return root

        with self.track_time():
            for dup_file in self.input_folder.list_files(glob_pattern="*.dups"):
                with self.input_folder.open(dup_file, "rb") as f:
                    for f1, d1, f2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=self.lines_to_buffer):
                        a, b = find((f1, d1)), find((f2, d2))
                        if a != b:
                            # union by minimum: the root is always the earliest document of its cluster
                            parent[max(a, b)] = min(a, b)
            maps = load_source_maps(self.source_maps)
            matrix = empty_matrix(self.names)
            with self.output_folder.get_output_file_manager(mode="wb") as out:
                for node in sorted(parent):
                    root = find(node)
                    self.stat_update("duplicates")
                    if node != root:
                        out.write(f"{node[0]:06d}.remove", struct.pack("<I", node[1]))
                        matrix[source_at(maps, *node)][source_at(maps, *root)] += 1
                        self.stat_update("to_remove")
        write_json(self.overlap_path, matrix)
