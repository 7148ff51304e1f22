"""Prefix caching: keys and values of prompt blocks that earlier requests prefilled, kept on the host for reuse.

As vLLM's automatic prefix caching: a prompt is cut into blocks of BLOCK_TOKENS tokens; a block's key is a
digest of its tokens and its parent block's key (a hash chain), so a key names the whole prefix up to the
block's end. A new prompt reuses the longest run of its first blocks found in the cache; its rows copy their
keys and values into its slot and prefill only the tokens after them. The cache holds at most `max_tokens`
tokens' worth of blocks (numpy copies); the least recently used block goes first when it is full. A lookup or
an insert marks a prompt's blocks used from its last block back to its first, so a chain is dropped from its
end: a cached block's parent is always cached too.
"""

import collections
import hashlib

import numpy as np

BLOCK_TOKENS = 16
DEFAULT_TOKENS = 4096  # `tfgen serve --prefix-cache-tokens` default: e.g. 2 x 12 layers x 768 x 4 bytes a token
# for KoGPT2-base, 288 MiB


def block_keys(token_ids, block_tokens=BLOCK_TOKENS):
    """The hash chain of the prompt's full blocks: the key of block i names tokens 0..(i+1)*block_tokens-1."""
    keys, parent = [], b""
    tokens = np.asarray(token_ids, np.int64)
    for end in range(block_tokens, len(tokens) + 1, block_tokens):
        parent = hashlib.sha256(parent + tokens[end - block_tokens : end].tobytes()).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Blocks of keys and values by their chain key, least recently used first; at most `max_tokens` tokens."""

    def __init__(self, max_tokens=DEFAULT_TOKENS, block_tokens=BLOCK_TOKENS):
        if max_tokens < 0:
            raise ValueError(f"the prefix cache holds 0 or more tokens (0: off), got {max_tokens}")
        self.block_tokens = block_tokens
        self.max_blocks = max_tokens // block_tokens
        self._blocks = collections.OrderedDict()  # key -> (keys, values), each [layers, heads, block_tokens, d]

    def __len__(self):
        return len(self._blocks)

    def tokens(self):
        """Tokens whose keys and values the cache holds."""
        return len(self._blocks) * self.block_tokens

    def reusable(self, token_ids):
        """How many of the prompt's first tokens a row can take from the cache: whole cached blocks, all before the
        prompt's last token (which the row's first step feeds)."""
        found = 0
        for key in block_keys(token_ids[:-1], self.block_tokens):
            if key not in self._blocks:
                break
            found += 1
        return found * self.block_tokens

    def take(self, token_ids):
        """(count, keys, values): the `reusable` count of the prompt's first tokens and their keys and values
        [layers, heads, count, d] (None if count is 0), marked most recently used."""
        count = self.reusable(token_ids)
        if not count:
            return 0, None, None
        chain = block_keys(token_ids[:count], self.block_tokens)
        self._touch(chain)
        blocks = [self._blocks[key] for key in chain]
        return (count, *(np.concatenate([block[i] for block in blocks], axis=2) for i in (0, 1)))

    def add(self, token_ids, columns_of):
        """Caches the prompt's whole blocks before its last token that the cache lacks, from a row that holds its
        keys and values: `columns_of(start, end)` -> its keys and values [layers, heads, end-start, d] of those
        columns (called once, for missing blocks only). Drops least recently used blocks past the budget."""
        chain = block_keys(token_ids[:-1], self.block_tokens)
        held = next((i for i, key in enumerate(chain) if key not in self._blocks), len(chain))
        if self.max_blocks and held < len(chain):
            keys, values = columns_of(held * self.block_tokens, len(chain) * self.block_tokens)
            for i, key in enumerate(chain[held:]):
                columns = slice(i * self.block_tokens, (i + 1) * self.block_tokens)
                self._blocks[key] = (np.array(keys[:, :, columns]), np.array(values[:, :, columns]))
        self._touch(chain)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def _touch(self, chain):
        """Marks a chain's blocks most recently used, its first block last (the first to stay)."""
        for key in reversed(chain):
            if key in self._blocks:
                self._blocks.move_to_end(key)
