"""PDLR: MVLR's prompt-driven label representation over a frozen open_clip text encoder.

For ``C`` class names and the text projection width ``d`` (512 for ViT-B-16 and
RN101, 1024 for RN50)::

    T^hard = E("This photo contains [CLS].")                  (C, d)  frozen, cached
    T^soft = E([SOS][ctx_1..ctx_L][CLS tokens][.][EOS])       (C, d)  ctx learnable

``E`` is the frozen open_clip text encoder (token embedding, positional
embedding, causal transformer, ln_final, pooling at the EOS token, text
projection). The soft path runs it from token embeddings, with the ``L``
learnable context vectors (CoOp) in place of the tokens after SOS.

open_clip (``pip install open_clip_torch``) is an optional dependency of vlssm:
it is imported when a :class:`PDLR` is built, never by ``import vlssm``.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["PDLR"]

_SCHEMAS = ("hf-hub:", "local-dir:")
_CHUNK = 256  # class prompts per encoder call when caching T^hard


#: vlssm's own open_clip model configs (``vlssm/models/configs/*.json``: the random-weight demo
#: backbones ``vlssm-demo-RN`` and ``vlssm-demo-ViT``), added to open_clip's registry on first import
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "configs")


def _import_open_clip(what: str = "vlssm.PDLR"):
    """open_clip (with vlssm's demo configs registered), or an ImportError saying that ``what``
    needs it and how to install it."""
    try:
        open_clip = importlib.import_module("open_clip")
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{what} needs open_clip: `pip install open_clip_torch` (or `pip install vlssm[clip]`)"
        ) from e
    if not getattr(open_clip, "_vlssm_configs", False):
        open_clip.add_model_config(_CONFIG_DIR)
        open_clip._vlssm_configs = True
    return open_clip


class _TextEncoder(nn.Module):
    """The text parts of an open_clip model, run from token embeddings.

    The submodules and parameters are those of the open_clip model (shared,
    not copied): ``token_embedding``, ``positional_embedding``,
    ``transformer``, ``ln_final``, ``text_projection`` and the ``attn_mask``
    buffer (non-persistent, as in open_clip).
    """

    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.register_buffer("attn_mask", src.attn_mask, persistent=False)
        self.pool_type = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
        self.eos_id = getattr(src, "text_eos_id", None) if hasattr(src, "text_eos_id") else getattr(src, "eos_id", None)
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise ValueError(f"PDLR: unsupported open_clip text pool_type {self.pool_type!r}")
        if self.pool_type == "eos" and self.eos_id is None:
            raise ValueError("PDLR: open_clip text pool_type 'eos' without an eos_id")

    @property
    def width(self) -> int:
        """Token-embedding width (the width of the context vectors)."""
        return self.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def out_dim(self) -> int:
        """Width ``d`` of the encoded text features."""
        p = self.text_projection
        if p is None:
            return self.width
        if isinstance(p, nn.Linear):
            return p.out_features
        return p.shape[1]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (n, context_length, width) of token ids (n, context_length)."""
        return self.token_embedding(tokens)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip ``CLIP.encode_text(tokens, normalize=False)``, from the token embeddings ``x``.

        Args:
            x: token embeddings (n, T, width) with T <= context_length; any of them may be learnable.
            tokens: the token ids (n, T) that locate the pooled (EOS) position.
        Returns:
            (n, d) text features.

        A prefix of T < context_length tokens gives the same features as the
        full sequence whenever every EOS lies inside it (the transformer is
        causal: no position attends to a later one, and ln_final is per token),
        at a fraction of the cost; :func:`eos_length` is the shortest such T.
        """
        T = x.shape[1]
        if T > self.context_length or tokens.shape[1] != T:
            raise ValueError(f"x (n, T, width) and tokens (n, T) must share T <= {self.context_length}, "
                             f"got {tuple(x.shape)} and {tuple(tokens.shape)}")
        cast_dtype = self.transformer.get_cast_dtype()
        x = x.to(cast_dtype) + self.positional_embedding[:T].to(cast_dtype)
        mask = self.attn_mask
        x = self.transformer(x, attn_mask=None if mask is None else mask[:T, :T])
        x = self.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "argmax":  # EOS has the largest id in CLIP's vocabulary
            x = x[rows, tokens.argmax(dim=-1)]
        elif self.pool_type == "eos":
            x = x[rows, (tokens == self.eos_id).int().argmax(dim=-1)]
        elif self.pool_type == "first":
            x = x[:, 0]
        else:
            x = x[:, -1]
        p = self.text_projection
        if p is not None:
            x = p(x) if isinstance(p, nn.Linear) else x @ p
        return x

    def eos_length(self, tokens: torch.Tensor) -> int:
        """The shortest prefix length of token ids (n, context_length) holding every row's pooled
        position: the last EOS + 1 (argmax / eos pooling), 1 ("first"), the full length ("last" pooling, or
        an encoder without a causal mask)."""
        if self.attn_mask is None or self.pool_type == "last":  # not causal, or pooled at the end
            return tokens.shape[1]
        if self.pool_type == "first":
            return 1
        pos = tokens.argmax(dim=-1) if self.pool_type == "argmax" else (tokens == self.eos_id).int().argmax(dim=-1)
        return int(pos.max()) + 1

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
        """Features (n, d) of token ids (n, context_length), without autograd, in chunks, each
        truncated after its last EOS (the same features: see :meth:`forward`)."""
        out = []
        for t in tokens.split(chunk):
            t = t[:, :self.eos_length(t)]
            out.append(self(self.embed(t), t))
        return torch.cat(out, 0)


def _text_source(clip_model: nn.Module) -> nn.Module:
    """The module holding the text parts of an open_clip model (CLIP, or CustomTextCLIP.text)."""
    names = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    for src in (clip_model, getattr(clip_model, "text", None)):
        if isinstance(src, nn.Module) and all(hasattr(src, n) for n in names):
            if getattr(src, "cls_emb", None) is not None or getattr(src, "use_pad_mask", False):
                raise ValueError(
                    "PDLR: open_clip text towers with a class token or a padding mask (CoCa-style) are not supported"
                )
            return src
    raise TypeError(
        "clip_model must be an open_clip CLIP model with a transformer text tower (token_embedding, "
        f"positional_embedding, transformer, ln_final, text_projection, attn_mask), got {type(clip_model).__name__}"
    )


class PDLR(nn.Module):
    """Prompt-driven label representation (MVLR): hard and soft prompts through a frozen CLIP text encoder.

    ``forward()`` returns ``(t_hard, t_soft)``, both (C, d) for ``C`` class names
    and ``d`` the text projection width (512 for ViT-B-16 and RN101, 1024 for RN50):

    * ``t_hard``: ``hard_template.format(name)`` ("This photo contains [CLS].")
      encoded by the frozen encoder. Computed once at construction and kept as
      the persistent buffer ``t_hard`` (constant: the encoder is frozen); it is
      returned as is, without autograd history (do not modify it in place).
      :meth:`refresh_hard` recomputes it (e.g. after loading other encoder
      weights into ``text_encoder`` by hand).
    * ``t_soft``: CoOp soft prompts ``[SOS][ctx_1..ctx_L][name tokens][.][EOS]``
      run through the frozen encoder from token embeddings; the context ``ctx``
      is the only trainable parameter, (L, w) shared by all classes or
      (C, L, w) with ``class_specific=True`` (``w`` = token-embedding width).

    The text encoder (``text_encoder``: token_embedding, positional_embedding,
    transformer, ln_final, text_projection and the attn_mask buffer) is frozen:
    its parameters have ``requires_grad=False``, it stays in eval mode whatever
    :meth:`train` is given, and gradients pass through it to ``ctx`` only.
    Only the text parts of the open_clip model are kept: the visual tower is
    not referenced, so when PDLR builds the model itself it is freed after
    construction.

    Args:
        classnames: the ``C`` class names (a non-empty list/tuple of non-empty
            strings; ``_`` is read as a space, as in CoOp).
        model_name: open_clip architecture (``open_clip.list_models()``), e.g.
            ``"ViT-B-16"``, ``"RN50"``, ``"RN101"``; also picks the tokenizer
            (``open_clip.get_tokenizer(model_name)``, offline for CLIP's BPE).
        checkpoint: ``None`` for random weights (nothing is downloaded), or a
            local file loaded by open_clip (``create_model(model_name,
            pretrained=checkpoint)``): an open_clip/OpenAI checkpoint or a
            ``torch.save``-d state_dict of the full CLIP model.
        n_ctx: number ``L`` >= 1 of learnable context vectors.
        hard_template: the hard prompt, with one ``{}`` for the class name.
        ctx_init: phrase whose token embeddings initialise the context when it
            has exactly ``n_ctx`` tokens (CoOp's "a photo of a" for L = 4);
            otherwise, or with ``None``, the context is drawn from
            normal(0, 0.02). ``ctx_init_phrase`` records which was used.
        class_specific: one context per class (C, L, w) instead of a shared (L, w).
        clip_model: an existing open_clip model to take the text encoder from
            (instead of building ``model_name``). Its text modules are shared,
            not copied, and are frozen in place (``requires_grad_(False)``,
            eval mode, moved by ``device``/``dtype``); the model must match
            ``model_name``'s tokenizer.
        device, dtype: where and in what dtype the text encoder and ``ctx`` live
            (default: the encoder's own).

    Shapes: ``forward() -> (t_hard (C, d), t_soft (C, d))``.
    """

    def __init__(
        self,
        classnames: Sequence[str],
        model_name: str = "ViT-B-16",
        checkpoint: Optional[str] = None,
        n_ctx: int = 4,
        hard_template: str = "This photo contains {}.",
        ctx_init: Optional[str] = "a photo of a",
        class_specific: bool = False,
        clip_model: Optional[nn.Module] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        classnames = self._check_args(classnames, model_name, checkpoint, n_ctx, hard_template, ctx_init, clip_model)
        open_clip = _import_open_clip()
        known = open_clip.list_models()
        if model_name not in known and not model_name.startswith(_SCHEMAS):
            raise ValueError(
                f"unknown open_clip model_name {model_name!r}; choose one of open_clip.list_models(), "
                f"e.g. {', '.join(n for n in ('RN50', 'RN101', 'ViT-B-16', 'ViT-B-32') if n in known)}"
            )
        if clip_model is None:
            clip_model = open_clip.create_model(model_name, pretrained=checkpoint)
        encoder = _TextEncoder(_text_source(clip_model))
        del clip_model  # the visual tower is not kept
        if device is not None or dtype is not None:
            encoder.to(device=device, dtype=dtype)
        encoder.requires_grad_(False)
        encoder.eval()
        self.text_encoder = encoder
        self.classnames = classnames
        self.model_name = model_name
        self.n_ctx = int(n_ctx)
        self.hard_template = hard_template
        self.class_specific = bool(class_specific)

        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=encoder.context_length)
        dev = encoder.token_embedding.weight.device
        hard_tokens = self._tokenize([hard_template.format(n) for n in classnames], "hard prompt").to(dev)
        placeholder = "X"
        soft_tokens = self._tokenize(
            [" ".join([placeholder] * self.n_ctx) + " " + n + "." for n in classnames], "soft prompt"
        ).to(dev)
        x_id = int(self._tokenize([placeholder], "placeholder")[0, 1])
        if not bool((soft_tokens[:, 1:1 + self.n_ctx] == x_id).all()):  # pragma: no cover - tokenizer-specific
            raise ValueError(f"PDLR: the {model_name!r} tokenizer does not give one token per context placeholder")
        self.register_buffer("soft_tokens", soft_tokens, persistent=False)
        #: run the soft prompts through the first ``soft_length`` positions only (the last EOS + 1: the
        #: same features, see _TextEncoder.forward); False runs all context_length positions
        self.truncate = True
        self.soft_length = encoder.eos_length(soft_tokens)
        self._soft_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self.register_buffer("hard_tokens", hard_tokens, persistent=False)

        # Context vectors.
        C, L, w = len(classnames), self.n_ctx, encoder.width
        wdtype = encoder.token_embedding.weight.dtype
        self.ctx_init_phrase: Optional[str] = None
        init = None
        if ctx_init is not None:
            ids = self._tokenize([ctx_init], "ctx_init")[0]
            n_init = int(ids.argmax()) - 1  # tokens between SOS and EOS
            if n_init == L:
                with torch.no_grad():
                    init = encoder.embed(ids[1:1 + L].to(dev)).clone()
                self.ctx_init_phrase = ctx_init
        if init is None:
            init = torch.empty(L, w, device=dev, dtype=wdtype).normal_(std=0.02)
        if self.class_specific:
            init = init.unsqueeze(0).repeat(C, 1, 1)
        self.ctx = nn.Parameter(init.to(device=dev, dtype=wdtype))

        self.register_buffer("t_hard", encoder.encode(hard_tokens))

    # ------------------------------------------------------------------
    @staticmethod
    def _check_args(classnames, model_name, checkpoint, n_ctx, hard_template, ctx_init, clip_model) -> list:
        if isinstance(classnames, (str, bytes)) or not isinstance(classnames, (list, tuple)):
            raise TypeError(f"classnames must be a list or tuple of strings, got {type(classnames).__name__}")
        if len(classnames) == 0:
            raise ValueError("classnames must be non-empty")
        names = []
        for i, n in enumerate(classnames):
            if not isinstance(n, str):
                raise TypeError(f"classnames[{i}] must be a str, got {type(n).__name__}")
            n = n.replace("_", " ").strip()
            if not n:
                raise ValueError(f"classnames[{i}] is empty")
            names.append(n)
        if not isinstance(model_name, str):
            raise TypeError(f"model_name must be a str (see open_clip.list_models()), got {type(model_name).__name__}")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int):
            raise TypeError(f"n_ctx must be an int >= 1, got {type(n_ctx).__name__}")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if not isinstance(hard_template, str):
            raise TypeError(f"hard_template must be a str with one '{{}}', got {type(hard_template).__name__}")
        if hard_template.count("{}") != 1:
            raise ValueError(f"hard_template must contain exactly one '{{}}' for the class name, got {hard_template!r}")
        if ctx_init is not None and not isinstance(ctx_init, str):
            raise TypeError(f"ctx_init must be a str or None, got {type(ctx_init).__name__}")
        if checkpoint is not None:
            if clip_model is not None:
                raise ValueError("give either checkpoint or clip_model, not both")
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise TypeError(f"checkpoint must be a file path or None, got {type(checkpoint).__name__}")
            if not os.path.isfile(checkpoint):
                raise ValueError(f"checkpoint file not found: {os.fspath(checkpoint)!r}")
        if clip_model is not None and not isinstance(clip_model, nn.Module):
            raise TypeError(f"clip_model must be an open_clip model (nn.Module), got {type(clip_model).__name__}")
        return names

    def _tokenize(self, texts, what: str) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        L = self.text_encoder.context_length
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            for t in texts:
                n = len(encode(t)) + 2  # + SOS, EOS
                if n > L:
                    raise ValueError(f"{what} {t!r} has {n} tokens, more than the context length {L}")
        return tokens

    # ------------------------------------------------------------------
    def train(self, mode: bool = True) -> "PDLR":
        """Set train/eval mode; the frozen text encoder always stays in eval mode."""
        super().train(mode)
        self.text_encoder.eval()
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def out_dim(self) -> int:
        """Width ``d`` of ``t_hard`` and ``t_soft`` (the text projection width)."""
        return self.text_encoder.out_dim

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name!r}, num_classes={self.num_classes}, n_ctx={self.n_ctx}, "
            f"class_specific={self.class_specific}, out_dim={self.out_dim}"
        )

    @torch.no_grad()
    def refresh_hard(self) -> torch.Tensor:
        """Recompute the cached ``t_hard`` from the current encoder weights; returns it."""
        self.t_hard.copy_(self.text_encoder.encode(self.hard_tokens))
        return self.t_hard

    def soft_embeddings(self) -> torch.Tensor:
        """Soft-prompt token embeddings (C, T, w): the context after SOS; T = ``soft_length`` with
        ``truncate`` (default), else the context length."""
        tokens = self._soft_tokens()
        with torch.no_grad():
            emb = self.text_encoder.embed(tokens)
        C, L = emb.shape[0], self.n_ctx
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(C, -1, -1)
        return torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + L:]], dim=1)

    def _soft_tokens(self) -> torch.Tensor:
        return self.soft_tokens[:, :self.soft_length] if self.truncate else self.soft_tokens

    def _soft_key(self) -> tuple:
        """What ``t_soft`` depends on: the context and every encoder tensor (identity, in-place
        version, storage), and the truncation (rounding differs)."""
        tensors = (self.ctx, *self.text_encoder.parameters(), *self.text_encoder.buffers())
        return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors) + (self.truncate,)

    def soft(self) -> torch.Tensor:
        """T^soft (C, d), from the text encoder once per call in training; cached in eval mode while no
        gradient can reach ``ctx`` (``torch.no_grad()`` or a frozen ``ctx``) until the context or an
        encoder weight changes (in place or replaced), so inference does not run the text encoder."""
        cacheable = not self.training and not (torch.is_grad_enabled() and self.ctx.requires_grad)
        if cacheable:
            key = self._soft_key()
            if self._soft_cache is not None and self._soft_cache[0] == key:
                return self._soft_cache[1]
        tokens = self._soft_tokens()
        t_soft = self.text_encoder(self.soft_embeddings(), tokens)
        if cacheable:  # no gradient can reach ctx: nothing is lost by detaching
            t_soft = t_soft.detach()
        self._soft_cache = (key, t_soft) if cacheable else None
        return t_soft

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Label embeddings.

        Returns:
            ``(t_hard, t_soft)``, each (C, d): the cached hard-prompt features
            (no autograd history) and the soft-prompt features (differentiable
            with respect to ``ctx``; cached in eval mode, see :meth:`soft`).
        """
        return self.t_hard, self.soft()
