# Row layouts of the shared-memory tables, shared by every kernel.
#
# Each struct mirrors a numpy dtype in engine/store/layout.py field for field; the test
# tests/store/test_layout.py holds sizeof and every offset equal. Units on every field.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t


cdef enum:
    MAX_TIERS = 16
    MAX_ASSETS = 8

cdef enum Kind:
    KIND_PERP = 0
    KIND_FUTURE = 1
    KIND_OPTION = 2
    KIND_INVERSE_PERP = 3
    KIND_INVERSE_FUTURE = 4

cdef enum Mode:
    MODE_CROSS = 0
    MODE_ISOLATED = 1

cdef enum AccountFlag:                  # account flags bits
    ACCOUNT_FLAG_LIQUIDATION_OUTSTANDING = 1
    ACCOUNT_FLAG_ISOLATED_DEFAULT = 2   # new positions open isolated

cdef enum Status:                       # account status bits
    STATUS_BELOW_IM = 1                 # cross equity < cross initial margin
    STATUS_LIQUIDATABLE = 2             # cross equity < cross maintenance (strict), maintenance > 0
    STATUS_ISOLATED_LIQUIDATABLE = 4    # some isolated position below its maintenance
    STATUS_BANKRUPT = 8                 # cross equity < 0

ctypedef struct AssetRow:               # 64 bytes
    uint64_t seq                        # seqlock counter (writer: mark-price process)
    double price_usd                    # oracle price, USD per 1 asset
    double haircut                      # fraction of value not counted, [0, 1)
    int64_t scale                       # integer balance units per 1 asset
    int64_t ts_ns                       # time of the last price, UTC ns
    int64_t _pad[3]

ctypedef struct InstrumentRow:          # 768 bytes, written once at create
    int32_t kind                        # Kind
    int32_t settle_asset                # index into the asset table
    int32_t underlying                  # option: instrument index of the underlying, else -1
    int32_t n_tiers
    int32_t is_call                     # option: 1 call, 0 put
    int32_t _pad0
    double contract_size                # linear/option: base per contract; inverse: USD per contract
    int64_t qty_scale                   # integer quantity units per contract
    int64_t price_scale                 # integer price units per 1 quote
    double strike                       # option strike, quote
    int64_t expiry_ns                   # UTC ns, 0 for perpetuals
    double tier_floor[MAX_TIERS]        # notional floor, settle asset
    double tier_imr[MAX_TIERS]          # initial margin rate
    double tier_mmr[MAX_TIERS]          # maintenance margin rate
    double tier_init_amount[MAX_TIERS]  # settle asset
    double tier_maint_amount[MAX_TIERS] # settle asset
    char name[24]
    int64_t _pad1[5]

ctypedef struct PriceRow:               # 64 bytes
    uint64_t seq                        # seqlock counter (writer: mark-price process)
    double mark                         # mark price, quote per 1 base (option: premium per contract / contract_size)
    double index                        # index price, quote
    int64_t ts_ns                       # receive time of the tick that made this mark, UTC ns
    uint64_t price_seq                  # per-instrument count of published marks
    uint32_t flags                      # bit 0: frozen (below quorum)
    uint32_t _pad0
    uint64_t tick_seq                   # sequence number of the oracle tick that made this mark
    int64_t _pad

ctypedef struct AccountRow:             # 128 bytes; line 0 is what the hot path writes
    uint64_t seq                        # seqlock counter (writer: the partition's worker)
    int32_t status                      # Status bits from the last margin pass
    uint32_t flags                      # bit 0: liquidation outstanding
    double collateral_usd               # sum balance * price * (1 - haircut) (negative at full price)
    double cross_equity_usd             # collateral + cross unrealized PnL
    double cross_im_usd                 # cross initial margin
    double cross_mm_usd                 # cross maintenance margin
    int64_t account_id                  # external id
    int32_t partition
    int32_t n_positions                 # used slots, compact from slot 0
    int64_t balance[MAX_ASSETS]         # asset units (1/scale), signed

ctypedef struct PositionRow:            # 32 bytes
    int32_t instrument                  # index into the instrument table
    int32_t mode                        # Mode
    int64_t qty                         # quantity units (1/qty_scale contracts), signed: + long
    int64_t cost                        # settle units: linear sum(qty*cs*price), inverse sum(qty*cs/price)
    int64_t isolated_margin             # settle units; 0 for cross


# Kernel value structs (ext/_margin.pyx).
ctypedef struct PosValues:                  # one position at one mark, settle asset unless *_usd
    double notional                     # |qty| * cs * mark (linear), |qty| * cs / mark (inverse)
    double upnl                         # unrealized PnL
    double im                           # initial requirement
    double mm                           # maintenance requirement

ctypedef struct AcctValues:                 # one account at the current marks, USD
    double collateral_usd
    double cross_upnl_usd
    double cross_equity_usd
    double cross_im_usd
    double cross_mm_usd
    double iso_margin_usd               # sum of isolated margins
    double iso_upnl_usd
    double iso_im_usd
    double iso_mm_usd
    int status


ctypedef struct RingRecord:             # 64 bytes: one command for a partition's worker
    int32_t kind                        # RecordKind
    int32_t instrument                  # instrument index (fills)
    int64_t row                         # account row
    int64_t delta                       # fill: this account's signed qty units; collateral: amount units
    int64_t price                       # fill: price units
    int64_t fee                         # fill: fee units of the settle asset (negative: rebate)
    uint64_t ref                        # journal sequence number (fills) or request id (collateral)
    int64_t ts_ns                       # gateway receive time, UTC ns
    int64_t aux                         # fill: trade id; collateral: asset index

ctypedef struct RingHeader:             # 128 bytes: producer and consumer on separate lines
    uint64_t write_idx                  # next index the producer writes (monotonic)
    int64_t capacity                    # records (a power of two)
    int64_t _pad0[6]
    uint64_t read_idx                   # next index the consumer reads (monotonic)
    int64_t _pad1[7]
