"""The tasks that show what test-time learning does: associative recall beyond the attention window (`recall`),
needle in a haystack (`niah`), the TTL on/off demo on a saved model (`demo`) and long-document perplexity
(`perplexity`)."""
