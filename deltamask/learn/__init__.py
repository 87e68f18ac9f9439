"""Everything that needs torch, together: masks over a backbone's last blocks (`masking`), backbones by
name (`models`), local training and heads (`training`), the frozen prefix run once (`prefix_cache`), a
device's side of a round (`learner`) and the in-process federation (`sim`). The rest of `deltamask`
imports without torch."""
