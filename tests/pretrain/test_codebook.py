"""Online codebook: FIFO order, initialisation and how new words are sampled."""

import torch
import torch.nn.functional as F

from moca_eval.pretrain.codebook import OnlineCodebook, inner_token_ids, pick_new_words


def test_initial_words_are_unit_norm_and_nonnegative():
    torch.manual_seed(0)
    book = OnlineCodebook(16, 8, num_new=4)
    assert torch.allclose(book.words.norm(dim=1), torch.ones(16))
    assert (book.words >= 0).all()
    assert int(book.ptr) == 0


def test_push_replaces_the_oldest_words_in_queue_order():
    torch.manual_seed(0)
    book = OnlineCodebook(6, 3, num_new=2)
    initial = book.words.clone()
    batches = [torch.eye(3)[[0, 1]] * 2, torch.eye(3)[[2, 0]] * 3, torch.eye(3)[[1, 1]]]
    book.push(batches[0])
    assert torch.equal(book.words[:2], torch.eye(3)[[0, 1]])  # stored L2-normalised
    assert torch.equal(book.words[2:], initial[2:])
    assert int(book.ptr) == 2
    book.push(batches[1])
    book.push(batches[2])
    assert int(book.ptr) == 0  # wrapped around
    book.push(torch.eye(3)[[2, 2]])  # the oldest pair (first push) goes
    expected = torch.eye(3)[[2, 2, 2, 0, 1, 1]]
    assert torch.equal(book.words, expected)


def test_inner_token_ids_drop_the_border():
    assert inner_token_ids(6, 2).tolist() == [14, 15, 20, 21]
    assert inner_token_ids(4, 0).tolist() == list(range(16))


def _grid_tokens(n, grid, dim=5):
    # token (image i, position p) = one-hot-ish code that identifies both
    tokens = torch.zeros(n, grid * grid, dim)
    tokens[..., 0] = torch.arange(n).view(n, 1).float()
    tokens[..., 1] = torch.arange(grid * grid).view(1, -1).float()
    return tokens


def test_new_words_come_from_distinct_images_and_inner_positions():
    tokens = _grid_tokens(10, 6)
    words = pick_new_words(tokens, num_new=4, grid=6, border=2,
                           generator=torch.Generator().manual_seed(3))
    images = words[:, 0].long().tolist()
    positions = words[:, 1].long().tolist()
    assert len(set(images)) == 4  # one token from each of 4 different images
    assert set(positions) <= {14, 15, 20, 21}
    # the same generator state gives the same words (shared by every process)
    again = pick_new_words(tokens, num_new=4, grid=6, border=2,
                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(words, again)


def test_slices_of_a_global_batch_add_up_to_the_one_process_pick():
    tokens = torch.randn(8, 36, 5)
    full = pick_new_words(tokens, num_new=4, grid=6, border=2,
                          generator=torch.Generator().manual_seed(7))
    parts = [pick_new_words(tokens[off:off + 4], num_new=4, grid=6, border=2, offset=off,
                            global_batch=8, generator=torch.Generator().manual_seed(7))
             for off in (0, 4)]
    assert torch.allclose(parts[0] + parts[1], full)  # what the all-reduce sums under DDP


def test_push_normalises():
    book = OnlineCodebook(4, 2, num_new=2)
    book.push(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    assert torch.allclose(book.words[:2], F.normalize(torch.tensor([[3.0, 4.0], [0.0, -2.0]]), dim=1))
