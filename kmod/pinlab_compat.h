/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pinlab: every kernel-version difference lives here.
 *
 * Supported: Debian 6.1, 6.12, 7.2/7.3.  The pin API is described in the
 * kernel's Documentation/core-api/pin_user_pages.rst; what each mode does
 * per kernel is in docs/pinning-semantics.md (rows 1-5) of this repository.
 */
#ifndef _PINLAB_COMPAT_H
#define _PINLAB_COMPAT_H

#include <linux/version.h>
#include <linux/mm.h>

/*
 * v6.5 dropped the vmas argument of get_user_pages() and pin_user_pages()
 * (54d020692b34 "mm/gup: remove unused vmas parameter from
 * get_user_pages()", 4c630f307455 "mm/gup: remove vmas parameter from
 * pin_user_pages()").  Both must be
 * called with mmap_read_lock() held and may return fewer pages than
 * requested; callers loop.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 5, 0)
#define PINLAB_GUP_HAS_VMAS	1
#else
#define PINLAB_GUP_HAS_VMAS	0
#endif

static inline long pinlab_get_user_pages(unsigned long start,
					 unsigned long nr_pages,
					 unsigned int gup_flags,
					 struct page **pages)
{
#if PINLAB_GUP_HAS_VMAS
	return get_user_pages(start, nr_pages, gup_flags, pages, NULL);
#else
	return get_user_pages(start, nr_pages, gup_flags, pages);
#endif
}

static inline long pinlab_pin_user_pages(unsigned long start,
					 unsigned long nr_pages,
					 unsigned int gup_flags,
					 struct page **pages)
{
#if PINLAB_GUP_HAS_VMAS
	return pin_user_pages(start, nr_pages, gup_flags, pages, NULL);
#else
	return pin_user_pages(start, nr_pages, gup_flags, pages);
#endif
}

/*
 * The fast entry points have had the same signature on every supported
 * version (int nr_pages, no vmas).  They walk the page tables without
 * mmap_lock and fall back to the slow path themselves, taking mmap_lock:
 * the caller must not hold it.  pin_user_pages_fast() accepts
 * FOLL_LONGTERM (Documentation/core-api/pin_user_pages.rst, "CASE 2").
 */
static inline long pinlab_get_user_pages_fast(unsigned long start,
					      unsigned long nr_pages,
					      unsigned int gup_flags,
					      struct page **pages)
{
	return get_user_pages_fast(start, (int)min_t(unsigned long, nr_pages,
						     INT_MAX),
				   gup_flags, pages);
}

static inline long pinlab_pin_user_pages_fast(unsigned long start,
					      unsigned long nr_pages,
					      unsigned int gup_flags,
					      struct page **pages)
{
	return pin_user_pages_fast(start, (int)min_t(unsigned long, nr_pages,
						     INT_MAX),
				   gup_flags, pages);
}

/*
 * page_maybe_dma_pinned() was removed in 6.11; folio_maybe_dma_pinned()
 * exists on every supported version.
 */
static inline bool pinlab_page_maybe_dma_pinned(struct page *page)
{
	return folio_maybe_dma_pinned(page_folio(page));
}

/*
 * FOLL_* are #defines on 6.1 and an enum from 6.3 on, with different
 * values (FOLL_LONGTERM 0x10000 vs 1 << 8).  Only the symbolic names are
 * used; user space never passes raw FOLL_ values.
 */
#define PINLAB_FOLL_WRITE	FOLL_WRITE
#define PINLAB_FOLL_LONGTERM	FOLL_LONGTERM

#endif /* _PINLAB_COMPAT_H */
