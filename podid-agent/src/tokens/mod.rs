//! Getting, caching and refreshing tokens from upstream. Being written.
