// The numbers the converter (Python) and the native cache must agree on, defined once: the native
// code includes this file and plugin/schema.py reads it (installed next to it in the package).
// Plain "#define NAME integer" lines only: that is all the Python side parses.
#pragma once

#define LLAMA_FASTGEN_SCHEMA_VERSION 1
// a frequent class evicts when it holds more than budget + this many cells: decoding pays for one
// score read-back and selection every FREQUENT_EVICT_BATCH tokens, not every token
#define LLAMA_FASTGEN_FREQUENT_EVICT_BATCH 32
// upper bounds a GGUF from a stranger must respect
#define LLAMA_FASTGEN_MAX_CLASSES 64
#define LLAMA_FASTGEN_MAX_N_SINK 65536
#define LLAMA_FASTGEN_MAX_CELLS 16777216
